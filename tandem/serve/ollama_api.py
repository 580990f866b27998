"""Ollama-compatible routes: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

As in Ollama, `stream` defaults to true and streams NDJSON: one JSON object per line, the last
with `done: true`, `done_reason` and the counts and durations (nanoseconds: prompt_eval_duration
is the time to the first token, queueing included; eval_duration from it to the last). Sampling comes in
`options` (temperature, top_p, top_k, min_p, num_predict, seed, stop, repeat_penalty, ...);
unknown options are ignored, as Ollama does. Errors are Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from tandem.errors import TandemError
from tandem.runtime.grammar import json_grammar
from tandem.serve.errors import APIError, internal_error
from tandem.serve.model import Delta, Prompt, Run, ServedModel
from tandem.serve.transport import AbortingStream, accepted, drain, ndjson, parse_body

OLLAMA_VERSION = "0.6.0"  # the Ollama API these routes follow; clients gate features on it


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Options(_Body):
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None
    seed: int | None = None
    stop: StrictStr | list[StrictStr] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def sampling(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None, min_p=self.min_p,
                    seed=self.seed, stop=tuple(stop) if stop else None, repetition_penalty=self.repeat_penalty,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)

    def token_limit(self) -> int | None:
        if self.num_predict is None or self.num_predict < 0:  # -1 = no limit, -2 = fill the context
            return None
        if self.num_predict == 0:
            raise APIError(400, "options.num_predict must be >= 1, or -1 for no limit", param="options.num_predict")
        return self.num_predict


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    thinking: StrictStr | None = None
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls, rendered by the template


class _Request(_Body):
    model: StrictStr
    stream: StrictBool = True
    options: Options = Options()
    format: Any = None
    images: list[Any] | None = None

    def check_supported(self, messages: list[Message] = ()) -> None:
        if self.images or any(m.images for m in messages):
            raise APIError(400, "images are not supported: this server takes text only")

    def grammar(self) -> str | None:
        """Structured output (runtime/grammar.py): `format` "json" (any JSON object) or a JSON schema."""
        if self.format is None or self.format == "":
            return None
        if self.format != "json" and not isinstance(self.format, dict):
            raise APIError(400, 'format must be "json" or a JSON schema object')
        try:
            return json_grammar(self.format if isinstance(self.format, dict) else None)
        except TandemError as e:
            raise APIError(400, str(e)) from None


class ChatBody(_Request):
    messages: list[Message] = []
    tools: list[Any] | None = None


class GenerateBody(_Request):
    prompt: StrictStr = ""
    system: StrictStr | None = None
    raw: StrictBool = False
    suffix: StrictStr | None = None
    template: StrictStr | None = None


class ModelQuery(_Body):
    model: StrictStr | None = None
    name: StrictStr | None = None  # older clients send `name`


def ollama_router(model: ServedModel) -> APIRouter:
    router = APIRouter()

    @router.get("/api/version")
    async def version() -> dict:
        return {"version": OLLAMA_VERSION}

    @router.get("/api/tags")
    async def tags() -> dict:
        return {"models": [_model_entry(model)]}

    @router.get("/api/ps")
    async def running() -> dict:
        entry = _model_entry(model)
        return {"models": [{**entry, "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}]}

    @router.post("/api/show")
    async def show(request: Request) -> dict:
        query = await parse_body(request, ModelQuery)
        name = query.model or query.name
        if not name:
            raise APIError(400, "missing field 'model'")
        model.check_name(name)
        info = {"general.architecture": model.hf_config.get("model_type", "unknown"),
                "general.context_length": model.max_context}
        capabilities = ["completion"] + (["thinking"] if model.reasoning else [])
        capabilities += ["tools"] if model.tool_syntax else []
        return {"license": "", "modelfile": f"# served by tandem from {model.model_dir}\n", "parameters": "",
                "template": model.tokenizer.chat_template or "", "details": _details(model), "model_info": info,
                "capabilities": capabilities, "modified_at": _timestamp(model.created)}

    @router.post("/api/chat")
    async def chat(request: Request):
        body = await parse_body(request, ChatBody)
        body.check_supported(body.messages)
        model.check_name(body.model)
        if not body.messages:  # Ollama answers an empty chat by loading the model
            return _loaded(model, {"message": {"role": "assistant", "content": ""}})
        messages = [m.model_dump(exclude_none=True, exclude={"images"}) for m in body.messages]
        prompt = await model.chat_prompt_async(messages, tools=body.tools)
        return await _respond(request, model, body, prompt, chat=True)

    @router.post("/api/generate")
    async def generate(request: Request):
        body = await parse_body(request, GenerateBody)
        body.check_supported()
        if body.suffix or body.template:
            raise APIError(400, "suffix and template are not supported: send the full prompt (raw) instead")
        model.check_name(body.model)
        if not body.prompt:
            return _loaded(model, {"response": ""})
        if body.raw:
            prompt = await model.text_prompt_async(body.prompt)
        else:  # Ollama wraps the prompt in the model's template
            system = [{"role": "system", "content": body.system}] if body.system else []
            prompt = await model.chat_prompt_async(system + [{"role": "user", "content": body.prompt}])
        return await _respond(request, model, body, prompt, chat=False)

    return router


async def _respond(request: Request, model: ServedModel, body: _Request, prompt: Prompt, chat: bool):
    params = model.params(prompt, body.options.token_limit(), grammar=body.grammar(), **body.options.sampling())
    run = Run(len(prompt.ids))
    deltas = model.generate(prompt, params, run)
    await accepted(deltas)
    if body.stream:
        return AbortingStream(_lines(model, run, deltas, chat), media_type="application/x-ndjson")

    await drain(request, deltas)
    reply = Delta(run.content, run.reasoning, tool_calls=run.tool_calls)
    return JSONResponse(_final(model, run, _piece(reply, chat)))


def _piece(delta: Delta, chat: bool) -> dict:
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": delta.content}
        if delta.reasoning:
            message["thinking"] = delta.reasoning
        if delta.tool_calls:
            message["tool_calls"] = [call.ollama() for call in delta.tool_calls]
        return {"message": message}
    out: dict[str, Any] = {"response": delta.content}
    if delta.reasoning:
        out["thinking"] = delta.reasoning
    return out


async def _lines(model: ServedModel, run: Run, deltas: AsyncIterator[Delta], chat: bool) -> AsyncIterator[bytes]:
    try:
        async for delta in deltas:
            yield ndjson({"model": model.name, "created_at": _timestamp(), **_piece(delta, chat), "done": False})
        yield ndjson(_final(model, run, _piece(Delta(), chat)))
    except TandemError as e:
        yield ndjson({"error": str(e)})
    except Exception as e:  # noqa: BLE001 - a bug; log it, tell the client, keep serving
        yield ndjson({"error": internal_error("/api/ stream", e)})
    finally:
        await deltas.aclose()


def _final(model: ServedModel, run: Run, piece: dict) -> dict:
    ns = 1_000_000_000
    return {"model": model.name, "created_at": _timestamp(), **piece, "done": True,
            "done_reason": run.finish_reason or "stop",
            "total_duration": int(((run.finished or time.perf_counter()) - run.started) * ns), "load_duration": 0,
            "prompt_eval_count": run.prompt_tokens, "prompt_eval_duration": int(run.prefill_seconds * ns),
            "eval_count": run.completion_tokens, "eval_duration": int(run.decode_seconds * ns)}


def _loaded(model: ServedModel, piece: dict) -> JSONResponse:
    return JSONResponse({"model": model.name, "created_at": _timestamp(), **piece, "done": True,
                         "done_reason": "load"})


def _weight_files(model: ServedModel) -> list[Path]:
    root = model.model_dir
    if root is None or not root.exists():
        return []
    return [root] if root.is_file() else sorted([*root.glob("*.safetensors"), *root.glob("*.gguf")])


def _details(model: ServedModel) -> dict:
    kind = model.hf_config.get("model_type", "unknown")
    fmt = "gguf" if any(f.suffix == ".gguf" for f in _weight_files(model)) else "safetensors"
    return {"parent_model": "", "format": fmt, "family": kind, "families": [kind],
            "parameter_size": "", "quantization_level": str(model.hf_config.get("torch_dtype", ""))}


def _model_entry(model: ServedModel) -> dict:
    size = sum(f.stat().st_size for f in _weight_files(model))
    digest = hashlib.sha256(f"{model.name}:{model.model_dir}:{size}".encode()).hexdigest()
    return {"name": model.name, "model": model.name, "modified_at": _timestamp(model.created), "size": size,
            "digest": digest, "details": _details(model)}


def _timestamp(epoch: float | None = None) -> str:
    moment = datetime.fromtimestamp(epoch if epoch is not None else time.time(), tz=timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")
