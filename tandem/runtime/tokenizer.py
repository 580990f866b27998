"""Text <-> token ids: the model's tokenizer, its chat template, streaming decode and stop strings.

`Tokenizer.from_dir(model_dir)` reads the files a Hugging Face checkpoint ships
(tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json) and
behaves like transformers' `AutoTokenizer` for a tokenizer.json-based tokenizer, which is the
reference the tests hold it to:

- `encode(text)` adds special tokens only through tokenizer.json's post-processor. transformers 5
  drops `add_bos_token` / `add_eos_token` from tokenizer_config.json whenever tokenizer.json
  exists, so we ignore them too.
- `apply_chat_template` renders with a sandboxed jinja2 environment set up like transformers'
  (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that
  does not escape HTML, the `{% generation %}` tag), with the special tokens as variables;
  `encode_chat` then tokenizes the text WITHOUT adding special tokens (the template writes them).

Data path of a chat turn: messages -> apply_chat_template -> encode -> engine -> token ids ->
StreamDecoder (whole characters only) -> StopStrings (hold back possible stop prefixes) -> user.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from tokenizers import Tokenizer as _HFTokenizer

from tandem.errors import TandemError

log = logging.getLogger(__name__)

# Names under which chat APIs pass a message's reasoning; templates read one of the first two.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids, and its chat template."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_id: int | None,
        eos_ids: Iterable[int],
        chat_template: str | None,
        special_tokens: dict[str, str] | None = None,
        source: str = "<memory>",
    ) -> None:
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.chat_template = chat_template
        # Variables every template sees: bos_token, eos_token, pad_token, ... (as transformers passes them).
        self._special_tokens = dict(special_tokens or {})
        self._source = source

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the model directory `path`."""
        root = Path(path)
        if not root.is_dir():
            raise TandemError(f"model directory {root} does not exist: pass the folder that holds tokenizer.json.")
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TandemError(f"{tokenizer_file} is missing: put the model's tokenizer.json next to its weights.")
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
            raise TandemError(f"cannot read {tokenizer_file} ({e}): re-download the model's tokenizer.json.") from e
        # transformers encodes without the truncation and padding a tokenizer.json may carry; so do we.
        backend.no_truncation()
        backend.no_padding()
        try:
            backend.encode("Hello, world")  # a broken model or post-processor fails on every text: say so now
        except BaseException as e:
            if not _backend_error(e):
                raise
            raise TandemError(f"{tokenizer_file} cannot encode text ({type(e).__name__}: {e}): re-download the "
                              "model's tokenizer.json.") from None
        config = _read_json(root / "tokenizer_config.json")
        generation = _read_json(root / "generation_config.json")

        special_tokens = _special_tokens(config)
        # transformers adds named special tokens the vocabulary lacks; do the same so ids agree.
        missing = [t for t in dict.fromkeys(special_tokens.values()) if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens(missing)

        vocab = backend.get_vocab_size(with_added_tokens=True)

        def generation_id(key: str, value: Any) -> int | None:
            # As transformers and llama.cpp do, go on without an id that is no token -- but say so:
            # without an eos id, generation stops only at max tokens or a stop string.
            if _is_id(value) and 0 <= value < vocab:
                return value
            log.warning("%s: %s = %r is not a token id (the vocabulary has %d); ignored%s",
                        root / "generation_config.json", key, value, vocab,
                        ": generation does not stop on it" if key == "eos_token_id" else "")
            return None

        bos_id = backend.token_to_id(special_tokens["bos_token"]) if "bos_token" in special_tokens else None
        if bos_id is None and generation.get("bos_token_id") is not None:
            bos_id = generation_id("bos_token_id", generation["bos_token_id"])
        eos_ids = set()
        if "eos_token" in special_tokens and (eos_id := backend.token_to_id(special_tokens["eos_token"])) is not None:
            eos_ids.add(eos_id)
        gen_eos = generation.get("eos_token_id")
        # generation_config lists extra stop ids (e.g. <|eot_id|> and <|end_of_text|> for Llama 3).
        for token_id in gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]:
            if (token_id := generation_id("eos_token_id", token_id)) is not None:
                eos_ids.add(token_id)

        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=eos_ids,
            chat_template=_find_chat_template(root, config),
            special_tokens=special_tokens,
            source=str(root),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added and special tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def backend_json(self) -> str:
        """The whole tokenizer as tokenizer.json text (what structured output's grammar engine reads)."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str) and not text.isascii():
                _check_utf8(text)
            raise
        except BaseException as e:
            if not _backend_error(e):
                raise
            # e.g. a character the vocabulary lacks, with no unknown token to stand for it
            raise TandemError(f"the tokenizer of {self._source} cannot encode this text ({type(e).__name__}: {e}): "
                              "its tokenizer.json is broken or incomplete.") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) into the model's prompt text.

        `extra` becomes template variables (e.g. tools=[...], enable_thinking=False); it
        overrides the special-token variables, as in transformers.
        """
        if self.chat_template is None:
            raise TandemError(
                f"the model at {self._source} has no chat template: give raw text with `tandem generate --prompt`."
            )
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TandemError("a chat needs at least one message: pass a list of {'role': ..., 'content': ...} dicts.")
        for message in messages:
            if not isinstance(message, dict):
                raise TandemError(f"chat message {message!r} is not a dict: use {{'role': ..., 'content': ...}}.")
        check_template_vars(extra)
        variables = {
            "messages": [_normalize_message(m) for m in messages],
            "tools": None,  # transformers always defines these, so `tools is defined` holds
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
            **self._special_tokens,
            **extra,
        }
        try:
            return self._compiled_template.render(**variables)
        except _TemplateRaised as e:
            raise TandemError(f"the chat template rejected the conversation: {e.message}") from None
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError, LookupError, RecursionError,
                ArithmeticError, MemoryError) as e:
            # Templates run on request data: whatever they trip over is the request's problem.
            raise TandemError(f"the chat template failed to render ({type(e).__name__}: {e}): check the messages' "
                              "roles and fields and the template variables.") from e

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of the rendered chat; the template writes the special tokens, so none are added."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        try:
            return _compile_template(self.chat_template or "")
        except jinja2.TemplateSyntaxError as e:
            raise TandemError(
                f"the chat template of {self._source} has a syntax error ({e}, line {e.lineno}): fix or replace it."
            ) from e
        except (SyntaxError, RecursionError, MemoryError) as e:
            # jinja compiles templates to Python, which refuses e.g. {% break %} outside a loop;
            # deep nesting overflows the parser.
            raise TandemError(
                f"the chat template of {self._source} does not compile ({type(e).__name__}: {e}): fix or replace it."
            ) from e


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces that are whole characters.

    Byte-level BPE can split one character over several tokens, and some decoders change a
    token's text depending on its neighbours (leading spaces), so we decode a short window
    and emit only the growth of the text, holding it back while it ends in an incomplete
    UTF-8 sequence (decoded as U+FFFD). Concatenating every `push` and `flush` equals
    `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # window start: one emitted chunk of context before the new tokens
        self._done = 0  # ids before this index are already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self._ids.append(token_id)
        before, after = self._window()
        if after.endswith("\ufffd"):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        """Return whatever is held back, even an incomplete character, and reset."""
        before, after = self._window()
        self._ids, self._start, self._done = [], 0, 0
        return after[len(before):]

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._start:self._done], skip_special_tokens=self._skip)
        after = decode(self._ids[self._start:], skip_special_tokens=self._skip)
        if not after.startswith(before):
            # A decoder rewrote earlier text given later tokens; emit from where they agree.
            common = 0
            while common < min(len(before), len(after)) and before[common] == after[common]:
                common += 1
            before = before[:common]
        return before, after


class StopStrings:
    """Cuts streamed text at the first stop string, which may span several pieces.

    `feed` returns the text that is safe to show now and whether a stop string was hit. Text
    that could be the start of a stop string is held until the next piece settles it; the stop
    string itself is never emitted, and nothing after it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        stops = tuple(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise TandemError(f"stop strings must be non-empty strings, got {stops!r}: drop the empty ones.")
        self.stops = stops
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, piece: str) -> tuple[str, bool]:
        if self._stopped:
            return "", True
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held, self._stopped = "", True
            return text[: min(hits)], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release held text (the stream ended without completing a stop string)."""
        text, self._held = self._held, ""
        return text

    def _partial_suffix(self, text: str) -> int:
        # Longest suffix of `text` that is a proper prefix of some stop string.
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


# --- chat template environment ------------------------------------------------------------


class _TemplateRaised(jinja2.TemplateError):
    """`raise_exception(msg)` from a template: the conversation breaks the template's rules."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Templates write tool schemas into the prompt verbatim; jinja's own tojson would escape
    # <, >, & and sort keys, which changes the text the model was trained on.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() that refuses underscore names, so templates cannot reach internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja's: `self` may be a kwarg
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we just render it."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


# No tokenizer packs more characters than this into one token on average over a whole prompt.
MAX_CHARS_PER_TOKEN = 64


def check_prompt_chars(text: str, max_context: int) -> None:
    """Refuse a text that cannot fit the context window before tokenizing it: the tokenizer holds
    the interpreter while it runs and its memory grows with the text (a 4 MB prompt: ~4 s in which
    nothing else runs; a template that renders 200 MB exhausts memory)."""
    limit = MAX_CHARS_PER_TOKEN * max_context
    if len(text) > limit:
        raise TandemError(f"the prompt has {len(text)} characters but the context window is {max_context} "
                          f"tokens (at most ~{limit} characters): shorten the prompt")


# Names a request's extra template variables may not take: render's own arguments and the globals
# the templates call (tools, documents and the special tokens may be overridden, as in transformers).
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "self", "raise_exception",
                                         "strftime_now", "namespace"})


def check_template_vars(names) -> None:
    """Refuse extra chat-template variables that would replace what tandem passes (callers that
    spread a request's dict into apply_chat_template must check before the call)."""
    clash = sorted(set(names) & RESERVED_TEMPLATE_VARIABLES)
    if clash:
        raise TandemError(f"chat template variable(s) {', '.join(clash)}: tandem sets them itself, "
                          "a caller cannot set them.")


def _compile_template(source: str) -> jinja2.Template:
    # Chat templates come from model repositories: untrusted code, hence the sandbox.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    # OpenAI-style clients send content=None / tool_calls=None; templates handle a missing key
    # but print "None" for a None value, so drop them (transformers does the same).
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        # Templates read reasoning as `reasoning_content` (DeepSeek, Qwen) or `thinking` (gpt-oss).
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


# --- files ----------------------------------------------------------------------------------


def _backend_error(e: BaseException) -> bool:
    """An error of the tokenizers library: it raises plain Exceptions, and a panic in its Rust code
    (e.g. a post-processor naming a special token it does not define) is a PanicException, which
    derives from BaseException."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _check_utf8(text: str) -> None:
    """Refuse text holding lone UTF-16 surrogates (from "\\ud800" escapes), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TandemError(f"the text has a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}), "
                          "which is not valid Unicode: fix the prompt, messages or chat template.") from None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, an int of 5000 digits
        raise TandemError(f"cannot parse {path} ({e}): re-download it from the model's repository.") from e
    if not isinstance(data, dict):
        raise TandemError(f"{path} is not a JSON object: re-download it from the model's repository.")
    return data


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores a token as a string or as {"__type": "AddedToken", "content": ...}.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """Named special tokens (bos_token, eos_token, pad_token, image_token, ...) from tokenizer_config."""
    named = {k: _token_text(v) for k, v in config.items() if k.endswith("_token")}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # transformers 5 stores model-specific named tokens here
        named.update({k: _token_text(v) for k, v in extra.items()})
    return {k: v for k, v in named.items() if v is not None}


def _find_chat_template(root: Path, config: dict[str, Any]) -> str | None:
    # transformers 5 saves the template as chat_template.jinja, which wins over the config entry.
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TandemError(f"cannot read {jinja_file} ({e}): re-download it from the model's repository.") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        template = named.get("default")
    return template if isinstance(template, str) else None
