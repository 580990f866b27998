"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Streaming answers are server-sent events (`data: {chunk}` ... `data: [DONE]`); the first chunk
carries the assistant role, the last one the finish reason, then (with
`stream_options.include_usage`) one chunk with `usage` and no choices. DeepSeek-R1 style
`<think>` text comes back as `reasoning_content`, beside `content`. With `tools`, the model's calls
come back as `tool_calls` (serve/tool_calls.py; streamed whole, one delta per call) and the finish
reason `tool_calls`. Besides the standard `usage`,
a top-level `timings` object (llama.cpp's names) rides on the full response and on the last chunk.
`n` choices are n generations side by side (streamed chunks name their choice's index).
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
from tandem.serve.errors import APIError, error_body, internal_error
from tandem.serve.logprobs import CompletionLogprobs, chat_logprobs
from tandem.serve.model import Delta, Prompt, Run, ServedModel
from tandem.serve.openai_schemas import ChatRequest, CompletionRequest
from tandem.serve.transport import SSE_HEADERS, AbortingStream, accepted, drain, merged, parse_body, sse, together

log = logging.getLogger(__name__)


def usage(runs: list[Run]) -> dict[str, int]:
    """The prompt counted once, as OpenAI does with n choices; their completions added."""
    prompt, completion = runs[0].prompt_tokens, sum(run.completion_tokens for run in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def timings(runs: list[Run]) -> dict[str, float | int]:
    """tandem's timings beside the standard `usage`, named and defined as llama.cpp's server does:
    prompt_ms is the time to the first token (queueing included: under continuous batching a prompt's
    chunks share steps with other requests' decodes); predicted_ms runs from the first token to the
    last and predicted_n counts every generated token, so per_second = n / ms * 1000 for both. With
    n choices (llama.cpp has none): the slowest choice's times, every choice's tokens."""

    def rate(n: int, seconds: float) -> float:
        return round(n / seconds, 3) if seconds > 0 else 0.0

    prompt_n, predicted_n = runs[0].prompt_tokens, sum(run.completion_tokens for run in runs)
    prompt_s, predicted_s = max(run.prefill_seconds for run in runs), max(run.decode_seconds for run in runs)
    return {"prompt_n": prompt_n, "prompt_ms": round(prompt_s * 1e3, 3),
            "prompt_per_second": rate(prompt_n, prompt_s),
            "predicted_n": predicted_n, "predicted_ms": round(predicted_s * 1e3, 3),
            "predicted_per_second": rate(predicted_n, predicted_s)}


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
    """One generation per choice (n), each its own request in the engine (the prompt is prefilled
    once per choice). With a seed, choice i samples with seed + i: the choices differ and the
    response repeats; greedy choices are all the same answer."""
    queue = model.engine.max_queue
    if queue is not None and body.n > queue:  # its choices wait for their first tokens together
        raise APIError(400, f"n={body.n} choices cannot all wait in this server's queue of {queue} requests "
                       f"(--max-queue {queue}): ask for at most {queue}", param="n")
    runs = [Run(len(prompt.ids)) for _ in range(body.n)]
    seed = sampling.get("seed")  # choice 0's is checked as given
    per_choice = [model.params(prompt, max_tokens, **{**sampling, "seed": s})
                  for s in [seed] + [None if seed is None else (seed + i) % 2**63 for i in range(1, body.n)]]
    streams = [model.generate(prompt, p, run, split_reasoning=chat) for p, run in zip(per_choice, runs)]
    try:  # all submitted at once: a refusal of any (queue full: 429) withdraws the others
        await together([accepted(stream) for stream in streams])
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model.name}
    logprobs = [_logprobs_maker(model, chat) for _ in runs] if per_choice[0].logprobs is not None else None
    if body.stream:
        chunks = _chat_chunks if chat else _completion_chunks
        events = _events(head, runs, streams, chunks, body.include_usage, logprobs)
        return AbortingStream(events, media_type="text/event-stream", headers=SSE_HEADERS)

    await drain(request, *streams)
    choices = []
    for i, run in enumerate(runs):
        lp = logprobs[i](run.logprobs) if logprobs is not None else None
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": run.answer}
            if model.reasoning:
                message["reasoning_content"] = run.reasoning or None
            if run.tool_calls:
                message["tool_calls"] = [call.openai() for call in run.tool_calls]
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": run.openai_finish_reason})
        else:
            choices.append({"index": i, "text": run.content, "logprobs": lp, "finish_reason": run.openai_finish_reason})
    return JSONResponse({**head, "choices": choices, "usage": usage(runs), "timings": timings(runs)})


LogprobsMaker = Callable[[list[TokenLogprobs]], dict]
ChunkMaker = Callable[[dict, int, Delta | None, str | None, dict | None], dict]


def _logprobs_maker(model: ServedModel, chat: bool) -> LogprobsMaker:
    """One request's logprobs formatter (a completion's keeps its text offset from chunk to chunk)."""
    if chat:
        return lambda entries: chat_logprobs(model.pieces, entries)
    return CompletionLogprobs(model.pieces)


def _chat_chunks(head: dict, index: int, delta: Delta | None, finish: str | None, logprobs: dict | None) -> dict:
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
    choice = {"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": finish}
    return {**head, "object": "chat.completion.chunk", "choices": [choice]}


def _completion_chunks(head: dict, index: int, delta: Delta | None, finish: str | None, logprobs: dict | None) -> dict:
    text = delta.content if delta is not None else ""
    return {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


async def _events(head: dict, runs: list[Run], streams: list[AsyncIterator[Delta]], chunk: ChunkMaker,
                  include_usage: bool, logprobs: list[LogprobsMaker] | None) -> AsyncIterator[bytes]:
    """Chunks of every choice as they come, each naming its index; a choice's finish reason in a
    chunk when it ends. logprobs: one formatter per choice, None when the request did not ask
    (every chunk then says null)."""
    extra = {"usage": None} if include_usage else {}
    left, items = len(runs), merged(streams)
    try:
        if chunk is _chat_chunks:
            for i in range(len(runs)):
                yield sse({**chunk(head, i, None, None, None), **extra})
        async for i, delta in items:
            if delta is None:  # choice i is over
                left -= 1
                if left:
                    yield sse({**chunk(head, i, Delta(), runs[i].openai_finish_reason, None), **extra})
                continue
            lp = logprobs[i](delta.logprobs) if logprobs is not None else None
            yield sse({**chunk(head, i, delta, None, lp), **extra})
        # Every generation is over: the last chunk before [DONE] carries the timings (as in llama.cpp).
        final = {**chunk(head, i, Delta(), runs[i].openai_finish_reason, None), **extra}
        if include_usage:
            yield sse(final)
            final = {**chunk(head, 0, Delta(), None, None), "choices": [], "usage": usage(runs)}
        yield sse({**final, "timings": timings(runs)})
    except TandemError as e:  # after the status line went out, errors travel as an event
        yield sse(error_body("/v1", 400, str(e)))
    except Exception as e:  # noqa: BLE001 - a bug; log it, tell the client, keep serving
        yield sse(error_body("/v1", 500, internal_error("/v1 stream", e)))
    finally:  # a client gone mid-stream leaves `items` suspended: stop it before closing what it reads
        await items.aclose()
        for stream in streams:
            await stream.aclose()
    yield sse("[DONE]")


def _model_card(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "tandem",
            "max_model_len": model.max_context}

