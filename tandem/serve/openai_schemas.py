"""Request bodies of the OpenAI API, as pydantic models.

Unknown fields are allowed (clients send `user`, `metadata`, ...); fields we cannot honour
(best_of > 1, images, echo / prompt logprobs) are refused with a 400 that says so,
never silently ignored. Range checks of sampling values live in SamplingParams, so every front end
agrees; the logprobs counts are checked here too, against each API's own limit (chat 20,
completions 5).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from tandem.errors import TandemError
from tandem.runtime.grammar import json_grammar
from tandem.runtime.logprobs import MAX_LOGPROBS
from tandem.serve.errors import APIError

MAX_TOP_LOGPROBS = MAX_LOGPROBS  # chat's top_logprobs: 20, as OpenAI's
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's logprobs
MAX_CHOICES = 128  # n, as OpenAI's limit: each choice is a request of its own in the engine

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Body):
    type: str
    text: StrictStr | None = None


class ChatMessage(_Body):
    role: Role
    content: StrictStr | list[TextPart] | None = None
    reasoning_content: StrictStr | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls, rendered by the template
    tool_call_id: StrictStr | None = None  # a tool turn: the call it answers

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: string content, 'developer' read as 'system'."""
        if isinstance(self.content, list):
            bad = [p.type for p in self.content if p.type != "text"]
            if bad:
                raise APIError(400, f"message content of type {bad[0]!r} is not supported: this server takes text only",
                               param="messages")
            content: str | None = "".join(p.text or "" for p in self.content)
        else:
            content = self.content
        message = self.model_dump(exclude_none=True)
        message.update(role="system" if self.role == "developer" else self.role, content=content or "")
        return message


class StreamOptions(_Body):
    include_usage: StrictBool = False


PositiveInt = Annotated[StrictInt, Field(ge=1)]  # strict: true is not a count


class _Sampling(_Body):
    model: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extension, as is ignore_eos
    stop: StrictStr | list[StrictStr] | None = None
    ignore_eos: StrictBool | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    logit_bias: dict[str, Any] | None = None
    best_of: int | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.best_of is not None and self.best_of != 1:
            raise APIError(400, "best_of > 1 is not supported: send one request per candidate", param="best_of")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def sampling(self) -> dict[str, Any]:
        top_k = None if self.top_k == -1 else self.top_k  # -1 means off in vLLM's API
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=top_k, min_p=self.min_p, seed=self.seed,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    repetition_penalty=self.repetition_penalty, stop=tuple(stop) if stop else None,
                    ignore_eos=self.ignore_eos, logprobs=self.logprobs_count, grammar=self.output_grammar(),
                    logit_bias=self.token_biases())

    def token_biases(self) -> dict[int, float] | None:
        """logit_bias with its token-id keys (JSON object keys are strings) as ints."""
        if not self.logit_bias:
            return None
        try:
            biases = {int(k): v for k, v in self.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
        if len(biases) != len(self.logit_bias):
            raise APIError(400, "logit_bias names a token id twice (e.g. \"5\" and \"05\")", param="logit_bias")
        return biases

    def output_grammar(self) -> str | None:
        """Structured output (runtime/grammar.py) for response_format json_object / json_schema."""
        fmt = self.response_format
        kind = fmt.get("type", "text") if fmt else "text"
        if kind == "text":
            return None
        if kind not in ("json_object", "json_schema"):
            raise APIError(400, f"response_format type {kind!r} is not supported: use 'text', 'json_object' or "
                           "'json_schema'", param="response_format")
        spec = fmt.get("json_schema") if kind == "json_schema" else {"schema": None}
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, type(None))):
            raise APIError(400, "response_format json_schema must be {'name': ..., 'schema': {...}}",
                           param="response_format")
        try:
            return json_grammar(spec.get("schema", {}) if kind == "json_schema" else None)
        except TandemError as e:
            raise APIError(400, str(e), param="response_format") from None

    @property
    def logprobs_count(self) -> int | None:
        """SamplingParams.logprobs: None, or how many alternatives to report beside the chosen token."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None  # the deprecated form of tools
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}, as in vLLM
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs={self.top_logprobs} is out of range: use an integer in "
                           f"0..{MAX_TOP_LOGPROBS}", param="top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true: set it, or leave out top_logprobs",
                           param="top_logprobs")
        forced = self.tool_choice not in (None, "auto", "none")
        if forced and self.forced_tool is False:
            raise APIError(400, f"tool_choice {self.tool_choice!r} is not one of 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        if forced and not self.tools:
            raise APIError(400, "tool_choice forces a call, but the request has no `tools`", param="tool_choice")
        if forced and (self.response_format or {}).get("type", "text") != "text":
            raise APIError(400, "response_format and a forced tool_choice cannot be combined: the reply is tool "
                           "calls", param="tool_choice")
        if self.functions:
            raise APIError(400, "`functions` (deprecated by OpenAI) is not supported: send them as `tools`",
                           param="functions")

    @property
    def forced_tool(self) -> str | None | bool:
        """What tool_choice forces: None for 'required' (any tool, at least one call), a function's
        name for {'type': 'function', 'function': {'name': ...}}; False when it forces nothing
        (or is not understood)."""
        choice = self.tool_choice
        if choice == "required":
            return None
        fn = choice.get("function") if isinstance(choice, dict) and choice.get("type", "function") == "function" else None
        return fn["name"] if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"] else False

    @property
    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the template renders and the reply is parsed for: none with tool_choice 'none'."""
        return self.tools if self.tools and self.tool_choice != "none" else None

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    logprobs: StrictInt | None = None  # the legacy API's count of alternatives, 0..5

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(400, f"logprobs={self.logprobs} is out of range: use an integer in "
                           f"0..{MAX_COMPLETION_LOGPROBS}", param="logprobs")
        if self.echo and self.logprobs is not None:
            # The prompt's logprobs need logits for every prompt row; a step computes them only for
            # the row each sequence samples from.
            raise APIError(400, "echo with logprobs (the prompt tokens' logprobs) is not supported: leave out "
                           "echo, or logprobs", param="echo")
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and all(isinstance(p, str) for p in self.prompt):
            if len(self.prompt) != 1:
                raise APIError(400, "a list of several prompts is not supported: send one request per prompt",
                               param="prompt")
            return self.prompt[0]
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return self.prompt
