"""Drive the one Engine from asyncio code (the server): the Engine runs in its own thread.

The Engine is not thread-safe, so only the engine thread touches it. Commands (add a request,
abort one, run a function) travel to it through a queue; each request's StepOutputs travel back
to the request's asyncio.Queue through `loop.call_soon_threadsafe`. Requests that arrive while
others run join the Engine's batch (the scheduler admits up to `max_batch`; the rest wait).
With `max_queue`, a request that would make more than that many requests wait for their first
token is refused at once with QueueFull (the server answers 429).

    async with async_engine.request(prompt_ids, params) as outputs:   # TandemError if rejected
        async for out in outputs: ...                                  # StepOutputs
    # leaving the block early (client gone, cancelled) aborts the request and frees its KV blocks
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tandem.errors import NaNLogits, TandemError
from tandem.runtime.engine import Engine, StepFailed, StepOutput
from tandem.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

_ACCEPTED = object()  # first item on a request's queue once the Engine took it


class QueueFull(TandemError):
    """Too many requests are waiting for their first token; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int | None = None
    started: bool = False  # has produced a token (so it no longer counts as queued)
    pending: bool = False  # counted in AsyncEngine._pending (the asyncio side's view of the queue)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    """An Engine owned by one background thread, with an asyncio front."""

    def __init__(self, engine: Engine, max_queue: int | None = None, on_idle: Callable[[], Any] | None = None):
        """on_idle: called on the engine thread each time the Engine runs out of work (e.g.
        LLM.rebalance_hot_experts); its errors are logged, never raised into serving."""
        self.engine = engine
        self.max_queue = max_queue
        self.on_idle = on_idle
        self._pending = 0  # requests submitted that have no token yet, counted where they are submitted
        self._pending_lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._live: dict[int, _Request] = {}  # seq_id -> request; engine thread only
        self._queued = 0  # requests submitted that have no token yet (written by the engine thread)
        self._running = 0
        self.tokens_generated = 0  # by every request, including tokens nobody was waiting for any more

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() called twice")
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for their first token (admitted or not)."""
        return self._queued

    @property
    def running(self) -> int:
        """Requests producing tokens."""
        return self._running

    # --- requests ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def request(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[AsyncIterator[StepOutput]]:
        """Submit a request; raises TandemError at once if the Engine rejects it (QueueFull when
        `max_queue` requests already wait for their first token)."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running: call AsyncEngine.start() first")
        req = _Request(list(prompt), params, asyncio.get_running_loop())
        with self._pending_lock:
            if self.max_queue is not None and self._pending >= self.max_queue:
                raise QueueFull(f"the server is busy: {self._pending} requests are already waiting "
                                f"(--max-queue {self.max_queue}); retry in a moment")
            self._pending += 1
            req.pending = True
        self._commands.put(("add", req))
        try:
            first = await req.outputs.get()
            if isinstance(first, BaseException):
                raise first
            yield self._outputs(req)
        finally:
            self._unqueue(req)
            # A no-op when the request finished; otherwise this frees its sequence and KV blocks.
            self._commands.put(("abort", req))

    def _unqueue(self, req: _Request) -> None:
        with self._pending_lock:
            if req.pending:
                req.pending = False
                self._pending -= 1

    async def _outputs(self, req: _Request) -> AsyncIterator[StepOutput]:
        while True:
            item = await req.outputs.get()
            self._unqueue(req)
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread, between steps (inspection, tests)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", (fn, future)))
        return future

    # --- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                # Block only when the Engine is idle; otherwise take what is queued and step.
                try:
                    commands = [self._commands.get(block=not self.engine.has_work(), timeout=None)]
                except queue.Empty:
                    commands = []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for kind, arg in commands:
                    if kind == "stop":
                        self._fail_all(RuntimeError("the server is shutting down"))
                        return
                    self._command(kind, arg)
                if self.engine.has_work():
                    self._step()
                    if not self.engine.has_work() and self.on_idle is not None:
                        try:
                            self.on_idle()
                        except Exception:  # noqa: BLE001 - housekeeping must not stop serving
                            log.exception("the engine's idle hook failed")

    def _command(self, kind: str, arg: Any) -> None:
        if kind == "add":
            req: _Request = arg
            try:
                req.seq_id = self.engine.add_request(req.prompt, req.params)
            except TandemError as e:
                req.put(e)
                return
            self._live[req.seq_id] = req
            self._queued += 1
            req.put(_ACCEPTED)
        elif kind == "abort":
            req = arg
            if req.seq_id is not None and self._live.pop(req.seq_id, None) is not None:
                self.engine.abort(req.seq_id)
                self._forget(req)
        elif kind == "call":
            fn, future = arg
            try:
                future.set_result(fn(self.engine))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepFailed as e:  # the model failed on some sequences: fail their requests, run on
            log.error("engine step failed; aborting %d request(s), %d others continue", len(e.failed),
                      len(self._live) - len(e.failed), exc_info=e.error)
            for seq_id in e.failed:
                if (req := self._live.pop(seq_id, None)) is not None:
                    self._forget(req)
                    req.put(e.error)
            return
        except Exception as e:  # a bug: fail the requests in flight, keep serving the next ones
            log.exception("engine step failed; aborting %d request(s)", len(self._live))
            self._fail_all(e)
            return
        self.tokens_generated += len(outputs)
        for out in outputs:
            req = self._live.get(out.seq_id)
            if req is None:
                continue
            if not req.started:
                req.started = True
                self._queued -= 1
                self._running += 1
            if out.finish_reason is not None:
                self._live.pop(out.seq_id, None)
                self._forget(req)
            req.put(NaNLogits() if out.finish_reason == "error" else out)

    def _forget(self, req: _Request) -> None:
        if req.started:
            self._running -= 1
        else:
            self._queued -= 1

    def _fail_all(self, error: BaseException) -> None:
        for seq_id, req in list(self._live.items()):
            try:
                self.engine.abort(seq_id)
            except Exception:  # noqa: BLE001 - the engine is already in trouble; free what we can
                log.exception("abort of request %d failed", seq_id)
            self._forget(req)
            req.put(error)
        self._live.clear()
