"""The served model: names, prompts (chat template or text), sampling parameters, one generation.

Both API flavours go through here, so OpenAI and Ollama requests for the same prompt and
settings produce the same tokens as `LLM.generate`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from tandem.errors import TandemError
from tandem.runtime.async_engine import AsyncEngine, QueueFull
from tandem.runtime.engine import Engine
from tandem.runtime.llm import LLM
from tandem.runtime.logprobs import TokenLogprobs
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.tokenizer import check_prompt_chars, check_template_vars
from tandem.serve.errors import APIError
from tandem.serve.logprobs import TokenPieces
from tandem.serve.metrics import Metrics
from tandem.serve.reasoning import OPEN, ReasoningSplitter, prompt_opens_reasoning
from tandem.serve.tool_calls import ToolCall, ToolCallSplitter, check_tools, forced_grammar, syntax_of


@dataclass
class Prompt:
    ids: list[int]
    opens_reasoning: bool = False  # the chat template already wrote "<think>"
    tools: bool = False  # the template rendered tools: parse the output's tool calls


@dataclass
class Run:
    """One generation's results so far; complete when the stream ends."""

    prompt_tokens: int
    completion_tokens: int = 0
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None  # 'stop' | 'length' | None (aborted)
    tool_calls: list[ToolCall] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per generated token, when asked

    @property
    def prefill_seconds(self) -> float:
        return (self.first_token or self.started) - self.started

    @property
    def decode_seconds(self) -> float:
        return (self.finished or time.perf_counter()) - (self.first_token or self.started)

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1  # the first token comes out of the prefill step
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def openai_finish_reason(self) -> str | None:
        """OpenAI's finish reason: 'tool_calls' when the model stopped after calling tools."""
        return "tool_calls" if self.tool_calls and self.finish_reason == "stop" else self.finish_reason

    @property
    def answer(self) -> str | None:
        """The content of a finished reply; None when the model only called tools (as OpenAI sends)."""
        return None if self.tool_calls and not self.content.strip() else self.content


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    # Logprobs of the tokens generated since the last delta (when the request asked): a token whose
    # text is held back (part of a character, a possible stop string) rides on the delta that shows it.
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_index: int = 0  # the index of tool_calls[0] among the reply's calls


class ServedModel:
    def __init__(self, model: LLM | Engine, name: str | None, engine: AsyncEngine, metrics: Metrics):
        if isinstance(model, LLM):
            self.tokenizer, self.max_context = model.tokenizer, model.max_context
            self._make_params = model.sampling_params
            self.model_dir: Path | None = model.model_dir
            self.hf_config: dict[str, Any] = dict(model.hf_config or {})  # None for a GGUF model
        else:  # a bare Engine: no model directory, no generation_config defaults
            self.tokenizer, self.max_context = model.tokenizer, model.max_context
            self._make_params = _plain_params
            self.model_dir, self.hf_config = None, {}
        default = self.model_dir and (self.model_dir.stem if self.model_dir.suffix == ".gguf" else self.model_dir.name)
        self.name = name or default or "tandem"
        self.engine, self.metrics = engine, metrics
        # Split <think> blocks only for tokenizers that know the tag: other models may print it literally.
        self.reasoning = self.tokenizer.token_to_id(OPEN) is not None
        self.tool_syntax = syntax_of(self.tokenizer.chat_template)  # None: the template renders no tool calls
        self.created = int(time.time())
        self.pieces = TokenPieces(self.tokenizer)  # token strings and bytes of logprobs

    def check_name(self, requested: str | None) -> None:
        """Clients must ask for this model (Ollama style ':latest' accepted); empty means this one."""
        if requested in (None, "", self.name, f"{self.name}:latest"):
            return
        raise APIError(404, f"model {requested!r} is not served here; this server runs {self.name!r}",
                       param="model", code="model_not_found")

    # --- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]], template_vars: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> Prompt:
        """The chat rendered by the model's template (template_vars: a request's extra variables,
        e.g. enable_thinking; tools: OpenAI-style function tools the model may call) and tokenized."""
        template_vars = dict(template_vars or {})
        check_template_vars(template_vars)  # before the call: messages / self would collide with its arguments
        if tools:
            if self.tool_syntax is None:
                raise APIError(400, f"model {self.name!r} cannot call tools: its chat template does not render "
                               "tool calls in a syntax tandem reads (Hermes <tool_call>, DeepSeek, Mistral "
                               "[TOOL_CALLS]); leave out `tools`", param="tools")
            template_vars["tools"] = check_tools(tools)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_vars)
        check_prompt_chars(text, self.max_context)  # before the tokenizer, which holds the interpreter
        ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template wrote the specials
        return Prompt(ids, self.reasoning and prompt_opens_reasoning(text), tools=bool(tools))

    def tool_grammar(self, tools: list[dict[str, Any]] | None, name: str | None) -> str:
        """Structured output that makes the reply calls of `name` (None: of any of `tools`)."""
        if not tools or self.tool_syntax is None:  # chat_prompt refused tools the template cannot render
            raise APIError(400, "tool_choice forces a call, but no tools are offered", param="tool_choice")
        try:
            return forced_grammar(self.tool_syntax, self.tokenizer.chat_template or "", tools, name,
                                  self.tokenizer.token_to_id)
        except TandemError as e:
            raise APIError(400, str(e), param="tool_choice") from None

    async def chat_prompt_async(self, messages: list[dict[str, Any]], template_vars: dict[str, Any] | None = None,
                                tools: list[dict[str, Any]] | None = None) -> Prompt:
        """chat_prompt on a worker thread: a long conversation's template and tokenization must not
        hold up the event loop (other requests' streams, /health)."""
        return await anyio.to_thread.run_sync(self.chat_prompt, messages, template_vars, tools)

    async def text_prompt_async(self, prompt: str | list[int]) -> Prompt:
        """text_prompt on a worker thread (see chat_prompt_async)."""
        return await anyio.to_thread.run_sync(self.text_prompt, prompt)

    def text_prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            if not prompt:
                raise TandemError("the prompt is empty: give some text")
            check_prompt_chars(prompt, self.max_context)
            return Prompt(self.tokenizer.encode(prompt))
        return Prompt(list(prompt))

    def params(self, prompt: Prompt, max_tokens: int | None, **fields: Any) -> SamplingParams:
        """generation_config defaults, overridden by the request's non-None fields.

        Without max_tokens a request may fill the context window, as OpenAI and Ollama allow.
        """
        if max_tokens is None:
            max_tokens = max(1, self.max_context - len(prompt.ids))
        if fields.get("grammar") is not None and prompt.opens_reasoning:
            # The output would have to close the <think> block the prompt opened before any JSON.
            raise APIError(400, "structured output (response_format / format) is not supported with this chat "
                           "template: its prompt opens a <think> block the answer must close first")
        return self._make_params(max_new_tokens=max_tokens, **fields)

    # --- generation ---------------------------------------------------------------------------

    async def generate(self, prompt: Prompt, params: SamplingParams, run: Run,
                       split_reasoning: bool = True) -> AsyncIterator[Delta]:
        """Yield text deltas; `run` collects totals. The first delta is empty and comes as soon as
        the engine accepted the request (or TandemError if it refused it; APIError 429 with
        Retry-After when the queue is full), so a route can still answer 4xx before it starts streaming. Closing the iterator early aborts the generation."""
        splitter = ReasoningSplitter(prompt.opens_reasoning) if split_reasoning and self.reasoning else None
        pending: list[TokenLogprobs] = []  # logprobs not yet handed out in a delta
        tools = ToolCallSplitter(self.tool_syntax) if prompt.tools and self.tool_syntax is not None else None
        try:
            if params.grammar is not None:  # compiled here, on a worker thread, not on the engine's
                await anyio.to_thread.run_sync(self.engine.engine.grammars.prepare, params.grammar)
            async with self.engine.request(prompt.ids, params) as outputs:
                yield Delta()
                async for out in outputs:
                    if run.first_token is None:
                        run.first_token = time.perf_counter()
                    run.completion_tokens += 1
                    run.finish_reason = out.finish_reason
                    if out.logprobs is not None and not out.ended_by_token:  # the end token has no text
                        run.logprobs.append(out.logprobs)
                        pending.append(out.logprobs)
                    delta = self._delta(splitter, out.text, final=out.finish_reason is not None)
                    if tools is not None:
                        delta = self._calls(tools, delta, len(run.tool_calls), final=out.finish_reason is not None)
                        run.tool_calls += delta.tool_calls
                    run.content += delta.content
                    run.reasoning += delta.reasoning
                    if delta.content or delta.reasoning or delta.tool_calls:
                        delta.logprobs, pending = pending, []
                        yield delta
                if pending:  # tokens whose text never showed (e.g. cut by a stop string)
                    yield Delta(logprobs=pending)
        except QueueFull as e:  # only request() raises it, before anything was yielded
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        finally:
            run.finished = time.perf_counter()
            if run.first_token is not None:  # rejected requests generated nothing
                self.metrics.count_generation(run.prompt_tokens, run.completion_tokens, run.finish_reason,
                                              run.decode_tok_s)

    @staticmethod
    def _delta(splitter: ReasoningSplitter | None, text: str, final: bool) -> Delta:
        if splitter is None:
            return Delta(content=text)
        reasoning, content = splitter.feed(text)
        if final:
            more_reasoning, more_content = splitter.flush()
            reasoning, content = reasoning + more_reasoning, content + more_content
        return Delta(content, reasoning)

    @staticmethod
    def _calls(splitter: ToolCallSplitter, delta: Delta, index: int, final: bool) -> Delta:
        """The delta's content with its tool calls taken out (they follow any reasoning)."""
        content, calls = splitter.feed(delta.content)
        if final:
            more_content, more_calls = splitter.flush()
            content, calls = content + more_content, calls + more_calls
        return Delta(content, delta.reasoning, tool_calls=calls, tool_index=index)


def _plain_params(**fields: Any) -> SamplingParams:
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except TypeError as e:
        raise TandemError(f"unknown sampling option: {e}") from None
