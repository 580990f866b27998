"""HTTP plumbing shared by both APIs: JSON bodies into pydantic models, streaming responses that
stop their generation when the client goes away, and the same for non-streaming requests; several
generations of one request (OpenAI's n) drained or merged side by side.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
import pydantic
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tandem.serve.errors import APIError, validation_message

Model = TypeVar("Model", bound=pydantic.BaseModel)
Item = TypeVar("Item")


async def parse_body(request: Request, model: type[Model]) -> Model:
    """The body as `model`. Any content type is read as JSON: `curl -d` (form encoded) must work,
    as in Ollama's examples; cross-site browser posts are refused by the origin guard instead."""
    raw = await request.body()
    try:
        data = json.loads(raw)
        # "\ud800" escapes decode to lone surrogates, which no tokenizer (or UTF-8) can take.
        json.dumps(data, ensure_ascii=False).encode()
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply: send a flatter object") from None
    except UnicodeEncodeError:  # before ValueError, which it is
        raise APIError(400, "the request body has a string with a lone UTF-16 surrogate (an unpaired "
                       "\\ud800-\\udfff escape): send valid Unicode text") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and numbers over Python's digit limit
        raise APIError(400, f"the request body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        message, param = validation_message(e)
        raise APIError(400, message, param=param) from None


class AbortingStream(StreamingResponse):
    """A StreamingResponse that stops as soon as the client disconnects and always closes its
    iterator, so the generation behind it is aborted even while it produces nothing to send."""

    body_iterator: AsyncIterator[bytes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:  # the client closed the connection while we were writing
                    pass
                group.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def unless_disconnected(request: Request, work: Awaitable, poll_s: float = 0.25):
    """Await `work`, cancelling it (which aborts its generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def accepted(deltas: AsyncIterator) -> None:
    """Wait for a generation's first item: the engine took the request, or its TandemError (-> 400)
    is raised here, before any response has started."""
    try:
        await anext(deltas)
    except BaseException:
        await deltas.aclose()
        raise


async def drain(request: Request, *streams: AsyncIterator) -> None:
    """Run non-streamed generations to their ends, side by side, aborting them all if the client
    disconnects first or one of them fails (its error is raised)."""

    async def consume(deltas: AsyncIterator) -> None:
        try:
            async for _ in deltas:
                pass
        finally:
            await deltas.aclose()

    await unless_disconnected(request, together([consume(d) for d in streams]))


async def together(works: list[Awaitable]) -> None:
    """Await all of `works` as tasks; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


async def merged(streams: list[AsyncIterator[Item]]) -> AsyncIterator[tuple[int, Item | None]]:
    """The items of several generations as they come, as (index, item), and (index, None) when one
    ends. A failure in one is raised here; leaving early (or a failure) stops them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Item]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, _Failed(e)))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if isinstance(item, _Failed):
                raise item.error
            yield i, item
            left -= item is None
    finally:
        for task in tasks:  # cancelling a pump closes its generation where it waits
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def sse(data: dict | str) -> bytes:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def ndjson(data: dict) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
