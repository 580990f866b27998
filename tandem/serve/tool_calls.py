"""Tool calls in a model's output -> OpenAI / Ollama tool calls.

A model writes calls in the syntax its chat template renders earlier calls in, so the syntax is
read off the template (`syntax_of`):
    hermes    <tool_call>{"name": N, "arguments": {...}}</tool_call>, one block per call
              (Qwen2.5, Qwen3, QwQ and other Hermes-style templates)
    deepseek  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>N
              ```json {...} ```<｜tool▁call▁end｜> ... <｜tool▁calls▁end｜> (V3, R1), or
              <｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}<｜tool▁call▁end｜> (V3.1)
    mistral   [TOOL_CALLS] [{"name": N, "arguments": {...}}, ...] up to the end of the output
              (Mixtral 8x22B Instruct and other templates of Mistral's v3 tokenizer)

`ToolCallSplitter` works on streamed text pieces like the reasoning splitter: text outside calls is
content as it comes, a suffix that may begin a marker is held back until the next piece settles
it, and a call is released whole once its closing marker arrives (mistral's at the end). Text a
call holds that does not parse (bad JSON, no name, cut off by max_tokens) comes back as content,
markers included, so nothing the model wrote is lost.

tool_choice 'required' or a named function: `forced_grammar` is structured output (runtime/grammar.py)
that holds the reply to calls in the same syntax, each tool's arguments to its `parameters` schema.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.errors import TandemError
from tandem.runtime.grammar import JSON_STYLE, lark_grammar

_DS_CALLS_BEGIN, _DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN, _DS_CALL_END, _DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


@dataclass(frozen=True)
class Syntax:
    name: str
    open: str  # opens one unit (a call, or mistral's list of calls)
    close: str | None  # closes it; None: the unit runs to the end of the output
    dropped: tuple[str, ...] = ()  # markers around units that carry nothing (DeepSeek's outer pair)


SYNTAXES = {
    "hermes": Syntax("hermes", "<tool_call>", "</tool_call>"),
    "deepseek": Syntax("deepseek", _DS_CALL_BEGIN, _DS_CALL_END, (_DS_CALLS_BEGIN, _DS_CALLS_END)),
    "mistral": Syntax("mistral", "[TOOL_CALLS]", None),
}


def syntax_of(chat_template: str | None) -> Syntax | None:
    """The tool-call syntax a chat template renders calls in, or None when it renders none."""
    if not chat_template:
        return None
    if "tool▁call▁begin" in chat_template:
        return SYNTAXES["deepseek"]
    if "<tool_call>" in chat_template:
        return SYNTAXES["hermes"]
    if "[TOOL_CALLS]" in chat_template:
        return SYNTAXES["mistral"]
    return None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (what OpenAI's API carries)

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": json.loads(self.arguments)}}


def new_call_id(syntax: Syntax) -> str:
    # Mistral's templates refuse ids that are not 9 letters or digits.
    if syntax.name == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """A request's `tools`, checked: a list of {"type": "function", "function": {"name": ...}}."""
    if not isinstance(tools, list):
        raise TandemError("`tools` must be a list of {'type': 'function', 'function': {...}} objects")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise TandemError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise TandemError(f"tools[{i}].function.name must be a non-empty string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise TandemError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def forced_grammar(syntax: Syntax, chat_template: str, tools: list[dict[str, Any]], name: str | None,
                   token_id: Callable[[str], int | None]) -> str:
    """Structured output that makes the reply tool calls in the model's own syntax, their arguments
    held to each tool's `parameters` schema: one call of `name`, or (None: tool_choice 'required')
    one or more calls of any tool. token_id(marker): the marker's id when it is one token."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise TandemError(f"tool_choice names {name!r}, which is not among `tools`")

    def lit(text: str) -> str:  # a marker as one token where the vocabulary has it, else as text
        tid = token_id(text)
        return f"<[{tid}]>" if tid is not None else json.dumps(text, ensure_ascii=False)

    def args(fn: dict[str, Any]) -> dict[str, Any]:
        schema = fn.get("parameters") or {"type": "object"}
        return {**schema, "x-guidance": JSON_STYLE}

    def named(fn: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": args(fn)},
                "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_STYLE}

    many = "+" if name is None else ""
    if syntax.name == "hermes":
        call = {"anyOf": [named(fn) for fn in chosen], "x-guidance": JSON_STYLE}
        rules = [f'start: (unit "\\n"?){many}', f'unit: {lit("<tool_call>")} "\\n" call "\\n" {lit("</tool_call>")}',
                 f"call: %json {json.dumps(call)}"]
    elif syntax.name == "mistral":
        items = {"anyOf": [named(fn) for fn in chosen]}
        array = {"type": "array", "items": items, "minItems": 1, "x-guidance": JSON_STYLE}
        if name is not None:
            array["maxItems"] = 1
        rules = [f'start: {lit("[TOOL_CALLS]")} " " calls', f"calls: %json {json.dumps(array)}"]
    else:  # deepseek: V3 / R1 write "function<sep>NAME\n```json\nARGS\n```", V3.1 "NAME<sep>ARGS"
        fenced = "```json" in chat_template
        calls = []
        for i, fn in enumerate(chosen):
            head = (f'"function" {lit(_DS_SEP)} {json.dumps(fn["name"], ensure_ascii=False)} "\\n```json\\n"' if fenced
                    else f'{json.dumps(fn["name"], ensure_ascii=False)} {lit(_DS_SEP)}')
            tail = ' "\\n```"' if fenced else ""
            calls.append(f"call{i}: {lit(_DS_CALL_BEGIN)} {head} args{i}{tail} {lit(_DS_CALL_END)}")
            calls.append(f"args{i}: %json {json.dumps(args(fn))}")
        alts = " | ".join(f"call{i}" for i in range(len(chosen)))
        rules = [f"start: {lit(_DS_CALLS_BEGIN)} (unit){many} {lit(_DS_CALLS_END)}", f"unit: {alts}", *calls]
    return lark_grammar("\n".join(rules) + "\n")


class ToolCallSplitter:
    """feed(piece) -> (content, calls) ready to send; flush() at the end of the output.

    Whitespace between or after calls is held back and dropped unless more content follows it,
    so a reply that is only calls has no content."""

    def __init__(self, syntax: Syntax):
        self.syntax = syntax
        self._held = ""  # text not released yet: a possible marker start, or an open unit (marker first)
        self._in_unit = False
        self._space = ""  # whitespace after a call, released only before more content
        self.calls = 0  # calls released so far

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        text = self._held + piece
        self._held = ""
        content: list[str] = []
        calls: list[ToolCall] = []
        while text:
            if self._in_unit:
                close = self.syntax.close
                end = text.find(close, len(self.syntax.open)) if close else -1
                if end < 0:
                    self._held = text
                    break
                unit, text = text[: end + len(close)], text[end + len(close):]
                self._in_unit = False
                self._release(unit, content, calls)
                continue
            start, marker = self._next_marker(text)
            if start < 0:
                keep = self._partial_marker_suffix(text)
                self._content(text[: len(text) - keep], content)
                self._held = text[len(text) - keep:]
                break
            self._content(text[:start], content)
            if marker == self.syntax.open:
                self._in_unit = True
                text = text[start:]  # the unit keeps its marker, for the content fallback
            else:
                text = text[start + len(marker):]  # a marker that carries nothing
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        held, self._held = self._held, ""
        content: list[str] = []
        calls: list[ToolCall] = []
        if self._in_unit:
            self._in_unit = False
            self._release(held, content, calls, complete=self.syntax.close is None)
        else:
            self._content(held, content)
        return "".join(content), calls

    # --- helpers ----------------------------------------------------------------------------------

    def _markers(self) -> tuple[str, ...]:
        return (self.syntax.open, *self.syntax.dropped)

    def _next_marker(self, text: str) -> tuple[int, str]:
        best, found = -1, ""
        for marker in self._markers():
            i = text.find(marker)
            if i >= 0 and (best < 0 or i < best):
                best, found = i, marker
        return best, found

    def _partial_marker_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a marker."""
        longest = 0
        for marker in self._markers():
            for n in range(min(len(marker) - 1, len(text)), longest, -1):
                if text.endswith(marker[:n]):
                    longest = n
                    break
        return longest

    def _release(self, unit: str, content: list[str], calls: list[ToolCall], complete: bool = True) -> None:
        """A unit (markers included) -> calls, or back to content when it does not parse."""
        parsed = _parse_unit(self.syntax, unit) if complete else None
        if parsed is None:
            self._content(unit, content)
            return
        for name, arguments in parsed:
            calls.append(ToolCall(new_call_id(self.syntax), name, arguments))
        self.calls += len(parsed)

    def _content(self, text: str, content: list[str]) -> None:
        if not text:
            return
        if self.calls and not text.strip():
            self._space += text
            return
        content.append(self._space + text)
        self._space = ""


def _arguments_text(arguments: Any) -> str | None:
    """A call's arguments as JSON object text: an object as it is, or text holding one."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return None
    if not isinstance(arguments, dict):
        return None
    return json.dumps(arguments, ensure_ascii=False)


def _named_call(obj: Any) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = _arguments_text(obj.get("arguments", obj.get("parameters", {})))
    return (obj["name"], arguments) if arguments is not None else None


_FENCED = re.compile(r"\A\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*\Z", re.S)


def _parse_unit(syntax: Syntax, unit: str) -> list[tuple[str, str]] | None:
    body = unit[len(syntax.open): len(unit) - len(syntax.close or "")] if unit.startswith(syntax.open) else None
    if body is None or (syntax.close and not unit.endswith(syntax.close)):
        return None
    try:
        if syntax.name == "hermes":
            call = _named_call(json.loads(body))
            return [call] if call else None
        if syntax.name == "mistral":
            calls = json.loads(body)
            calls = calls if isinstance(calls, list) else [calls]
            parsed = [_named_call(c) for c in calls]
            return parsed if parsed and all(parsed) else None
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    # deepseek: "function<sep>NAME\n```json\nARGS\n```" (V3, R1) or "NAME<sep>ARGS" (V3.1)
    head, sep, rest = body.partition(_DS_SEP)
    if not sep:
        return None
    if head.strip() == "function":
        name, newline, args = rest.partition("\n")
        fenced = _FENCED.match(args) if newline else None
        args = fenced.group(1) if fenced else None
    else:
        name, args = head, rest
    name = name.strip()
    arguments = _arguments_text(args) if name and args is not None else None
    return [(name, arguments)] if arguments is not None else None
