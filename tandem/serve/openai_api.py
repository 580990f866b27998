"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Streaming answers are server-sent events (`data: {chunk}` ... `data: [DONE]`); the first chunk
carries the assistant role, the last one the finish reason, then (with
`stream_options.include_usage`) one chunk with `usage` and no choices. DeepSeek-R1 style
`<think>` text comes back as `reasoning_content`, beside `content`. With `tools`, the model's calls
come back as `tool_calls` (serve/tool_calls.py; streamed whole, one delta per call) and the finish
reason `tool_calls`. Besides the standard `usage`,
a top-level `timings` object (llama.cpp's names) rides on the full response and on the last chunk.
With `logprobs` (serve/logprobs.py), each chunk's choice carries the logprobs of the tokens its
text came from; they cover every generated token (in chat, `<think>` text included) but the eos /
stop token that ended the answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tandem.errors import TandemError
from tandem.runtime.logprobs import TokenLogprobs
from tandem.serve.errors import error_body, internal_error
from tandem.serve.logprobs import CompletionLogprobs, chat_logprobs
from tandem.serve.model import Delta, Prompt, Run, ServedModel
from tandem.serve.openai_schemas import ChatRequest, CompletionRequest
from tandem.serve.transport import SSE_HEADERS, AbortingStream, accepted, drain, parse_body, sse

log = logging.getLogger(__name__)


def usage(run: Run) -> dict[str, int]:
    return {"prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
            "total_tokens": run.prompt_tokens + run.completion_tokens}


def timings(run: Run) -> dict[str, float | int]:
    """tandem's timings beside the standard `usage`, named and defined as llama.cpp's server does:
    prompt_ms is the time to the first token (queueing included: under continuous batching a prompt's
    chunks share steps with other requests' decodes); predicted_ms runs from the first token to the
    last and predicted_n counts every generated token, so per_second = n / ms * 1000 for both."""

    def rate(n: int, seconds: float) -> float:
        return round(n / seconds, 3) if seconds > 0 else 0.0

    prompt_s, predicted_s = run.prefill_seconds, run.decode_seconds
    return {"prompt_n": run.prompt_tokens, "prompt_ms": round(prompt_s * 1e3, 3),
            "prompt_per_second": rate(run.prompt_tokens, prompt_s),
            "predicted_n": run.completion_tokens, "predicted_ms": round(predicted_s * 1e3, 3),
            "predicted_per_second": rate(run.completion_tokens, predicted_s)}


def openai_router(model: ServedModel) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(model)]}

    @router.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        model.check_name(name)
        return _model_card(model)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatRequest)
        body.check_supported()
        model.check_name(body.model)
        messages = [m.for_template() for m in body.messages]
        prompt = await model.chat_prompt_async(messages, body.chat_template_kwargs, body.offered_tools)
        sampling = body.sampling()
        if body.forced_tool is not False:  # tool_choice 'required' or a named function
            sampling["grammar"] = model.tool_grammar(body.offered_tools, body.forced_tool)
        return await _complete(request, model, body, prompt, body.token_limit, sampling, chat=True)

    @router.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        body.check_supported()
        model.check_name(body.model)
        prompt = await model.text_prompt_async(body.single_prompt())
        return await _complete(request, model, body, prompt, body.max_tokens, body.sampling(), chat=False)

    return router


async def _complete(request: Request, model: ServedModel, body: Any, prompt: Prompt, max_tokens: int | None,
                    sampling: dict[str, Any], chat: bool):
    params = model.params(prompt, max_tokens, **sampling)
    run = Run(len(prompt.ids))
    deltas = model.generate(prompt, params, run, split_reasoning=chat)
    await accepted(deltas)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model.name}
    logprobs = _logprobs_maker(model, chat) if params.logprobs is not None else None
    if body.stream:
        chunks = _chat_chunks if chat else _completion_chunks
        events = _events(head, run, deltas, chunks, body.include_usage, logprobs)
        return AbortingStream(events, media_type="text/event-stream", headers=SSE_HEADERS)

    await drain(request, deltas)
    lp = logprobs(run.logprobs) if logprobs is not None else None
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": run.answer}
        if model.reasoning:
            message["reasoning_content"] = run.reasoning or None
        if run.tool_calls:
            message["tool_calls"] = [call.openai() for call in run.tool_calls]
        choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": run.openai_finish_reason}
    else:
        choice = {"index": 0, "text": run.content, "logprobs": lp, "finish_reason": run.openai_finish_reason}
    return JSONResponse({**head, "choices": [choice], "usage": usage(run), "timings": timings(run)})


LogprobsMaker = Callable[[list[TokenLogprobs]], dict]
ChunkMaker = Callable[[dict, Delta | None, str | None, dict | None], dict]


def _logprobs_maker(model: ServedModel, chat: bool) -> LogprobsMaker:
    """One request's logprobs formatter (a completion's keeps its text offset from chunk to chunk)."""
    if chat:
        return lambda entries: chat_logprobs(model.pieces, entries)
    return CompletionLogprobs(model.pieces)


def _chat_chunks(head: dict, delta: Delta | None, finish: str | None, logprobs: dict | None) -> dict:
    if delta is None:  # the opening chunk
        fields: dict[str, Any] = {"role": "assistant", "content": ""}
    else:
        fields = {}
        if delta.reasoning:
            fields["reasoning_content"] = delta.reasoning
        if delta.content:
            fields["content"] = delta.content
        if delta.tool_calls:
            fields["tool_calls"] = [call.openai(delta.tool_index + i) for i, call in enumerate(delta.tool_calls)]
    choice = {"index": 0, "delta": fields, "logprobs": logprobs, "finish_reason": finish}
    return {**head, "object": "chat.completion.chunk", "choices": [choice]}


def _completion_chunks(head: dict, delta: Delta | None, finish: str | None, logprobs: dict | None) -> dict:
    text = delta.content if delta is not None else ""
    return {**head, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


async def _events(head: dict, run: Run, deltas: AsyncIterator[Delta], chunk: ChunkMaker, include_usage: bool,
                  logprobs: LogprobsMaker | None) -> AsyncIterator[bytes]:
    """logprobs: the request's formatter, None when it did not ask (every chunk then says null)."""
    extra = {"usage": None} if include_usage else {}
    try:
        if chunk is _chat_chunks:
            yield sse({**chunk(head, None, None, None), **extra})
        async for delta in deltas:
            lp = logprobs(delta.logprobs) if logprobs is not None else None
            yield sse({**chunk(head, delta, None, lp), **extra})
        # The generation is over: the last chunk before [DONE] carries the timings (as in llama.cpp).
        final = {**chunk(head, Delta(), run.openai_finish_reason, None), **extra}
        if include_usage:
            yield sse(final)
            final = {**chunk(head, Delta(), None, None), "choices": [], "usage": usage(run)}
        yield sse({**final, "timings": timings(run)})
    except TandemError as e:  # after the status line went out, errors travel as an event
        yield sse(error_body("/v1", 400, str(e)))
    except Exception as e:  # noqa: BLE001 - a bug; log it, tell the client, keep serving
        yield sse(error_body("/v1", 500, internal_error("/v1 stream", e)))
    finally:
        await deltas.aclose()
    yield sse("[DONE]")


def _model_card(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "tandem",
            "max_model_len": model.max_context}

