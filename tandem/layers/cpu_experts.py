"""Routed experts on the C++ CPU engine (tandem._C through ops.cpu): the default experts backend.

Bound to one MoE layer when the model is placed: the engine holds the layer's weights (repacked
from the checkpoint's float tensors or the GGUF file's blocks), this object holds the engine and
the layer id. submit() starts the engine and returns at once, so the shared experts (GPU or CPU)
run meanwhile; wait() collects [T, H].

With x on a GPU, nothing blocks the Python thread: the stream copies x / ids / weights into pinned
staging buffers, starts the engine, runs the shared experts, waits for the engine and copies the
result back. Starting and waiting go through the engine's doorbell when it has one (the stream
writes a word the engine's thread watches, then waits on a word that thread writes: ops.cpu.Doorbell)
or else through host functions (the stream blocks while a driver thread runs the engine's submit,
and again for its wait). The whole step stays in one stream, so it can be captured in a CUDA graph
(one HostCall per token count, on fixed buffers).
"""

import os

import torch
from torch import nn

from tandem.ops import cpu

# The engine computes in fp32 and reads x as fp32 or bf16.
_ENGINE_DTYPES = (torch.float32, torch.bfloat16)


class Staging:
    """Pinned buffers for x, ids, w and out of up to `capacity` tokens, shared by a model's layers
    (their calls are ordered on one stream). Growing keeps the old buffers alive: HostCalls made on
    them (and CUDA graphs holding those calls) stay valid."""

    def __init__(self, hidden: int, top_k: int, dtype: torch.dtype):
        self.hidden, self.top_k, self.dtype = hidden, top_k, dtype
        self.capacity = 0
        self.generation = 0  # bumped when the buffers are replaced
        self._old: list[tuple[torch.Tensor, ...]] = []

    def buffers(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if tokens > self.capacity:
            if self.capacity:
                self._old.append(self._bufs)
            self.capacity = max(tokens, 2 * self.capacity, 16)
            n, h, k = self.capacity, self.hidden, self.top_k
            pin = torch.cuda.is_available()
            self._bufs = (
                torch.empty(n, h, dtype=self.dtype, pin_memory=pin),
                torch.empty(n, k, dtype=torch.int32, pin_memory=pin),
                torch.empty(n, k, dtype=torch.float32, pin_memory=pin),
                torch.empty(n, h, dtype=self.dtype, pin_memory=pin),
            )
            self.generation += 1
        return tuple(b[:tokens] for b in self._bufs)


class CpuExperts(nn.Module):
    def __init__(self, engine: "cpu.Engine", layer: int, formats: tuple[str, str, str]):
        super().__init__()
        self.engine, self.layer, self.formats = engine, layer, formats
        # Output rows reused across calls (grown to the largest step seen), so the hot path allocates
        # nothing; a layer's output is consumed (added to the residual) before its next call.
        self._out = torch.empty(0)
        self._calls: dict[tuple[int, int], cpu.HostCall] = {}  # (staging generation, T) -> call
        self.last_stream_call: cpu.HostCall | None = None  # the call the last stream submit enqueued

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        if x.is_cuda:
            return self._submit_stream(x, ids, weights)
        xin = x if x.dtype in _ENGINE_DTYPES else x.float()
        if self._out.shape[0] < x.shape[0] or self._out.shape[1:] != x.shape[1:] or self._out.dtype != xin.dtype:
            self._out = torch.empty((max(x.shape[0], self._out.shape[0]),) + tuple(x.shape[1:]), dtype=xin.dtype)
        handle = cpu.submit(
            self.engine,
            self.layer,
            xin.to("cpu"),
            ids.to("cpu", torch.int32),
            weights.to("cpu", torch.float32),
            out=self._out[: x.shape[0]],
        )
        return handle, x.dtype, x.device

    def wait(self, pending, add: torch.Tensor | None = None) -> torch.Tensor:
        """The routed experts' output (+ add)."""
        if isinstance(pending[0], cpu.HostCall):
            return self._wait_stream(*pending, add)
        handle, dtype, device = pending
        out = cpu.wait(self.engine, handle).to(device=device, dtype=dtype)
        return out if add is None else out + add

    def _submit_stream(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        from tandem.ops.cuda_host import launch_host_func, write_value

        n, k = ids.shape
        dtype = x.dtype if x.dtype in _ENGINE_DTYPES else torch.float32
        key = (x.shape[1], k, dtype)
        staging = self.engine.staging.get(key) or self.engine.staging.setdefault(key, Staging(*key))
        bx, bids, bw, bout = staging.buffers(n)
        call = self._calls.get((staging.generation, n))
        if call is None:
            call = self._calls[(staging.generation, n)] = cpu.host_call(self.engine, self.layer, bx, bids, bw, bout)
        elif call.error:
            raise RuntimeError(f"CPU experts of engine layer {self.layer} failed in a stream call: {call.error}")
        self.last_stream_call = call
        self.last_stream_runs = call.calls + 1  # its run count once this submit ran (earlier ones ran: synced)
        bell = self.engine.doorbell
        if bell is not None:
            ring, done = bell.device_words
            write_value(done, 0)  # before the copies: a result an aborted step left can never pass
        if self._zero_copy(n):
            from tandem.ops.triton.host_io import to_host  # triton: imported on first use

            to_host(x, ids, weights, bx, bids, bw)  # one kernel writes the pinned buffers
        else:
            bx.copy_(x.to(dtype), non_blocking=True)
            bids.copy_(ids.to(torch.int32), non_blocking=True)
            bw.copy_(weights.to(torch.float32), non_blocking=True)
        if bell is not None:
            write_value(ring, bell.number(call))
        else:
            submit_fn, _, ctx = call.addresses
            launch_host_func(submit_fn, ctx)
        return call, x.dtype, x.device

    def _wait_stream(self, call: "cpu.HostCall", dtype: torch.dtype, device: torch.device,
                     add: torch.Tensor | None) -> torch.Tensor:
        from tandem.ops.cuda_host import launch_host_func, wait_value

        bell = self.engine.doorbell
        if bell is not None:
            wait_value(bell.device_words[1], bell.number(call))
        else:
            _, wait_fn, ctx = call.addresses
            launch_host_func(wait_fn, ctx)
        if self._zero_copy(call.out.shape[0]):
            from tandem.ops.triton.host_io import from_host  # triton: imported on first use

            return from_host(call.out, dtype, device, add)  # one kernel reads the pinned rows (and adds)
        out = call.out.to(device, non_blocking=True).to(dtype)
        return out if add is None else out + add

    @staticmethod
    def _zero_copy(n_tokens: int) -> bool:
        """Decode-sized steps move x / ids / w / out with ops/triton/host_io.py's kernels (larger
        ones, or with TANDEM_STAGING_COPIES set, with copies)."""
        if os.environ.get("TANDEM_STAGING_COPIES"):
            return False
        from tandem.ops.triton.host_io import HOST_IO_MAX_TOKENS  # triton: imported on first use

        return n_tokens <= HOST_IO_MAX_TOKENS

    def latest_call(self) -> "cpu.HostCall | None":
        """The stream call that ran last (replayed CUDA graphs run theirs without Python): profiles
        read its timestamps."""
        return max(self._calls.values(), key=lambda c: c.times_ns[0], default=None)

    @property
    def nbytes(self) -> int:
        return self.engine.layer_info(self.layer)["bytes"]

    def extra_repr(self) -> str:
        return f"layer={self.layer}, formats={'/'.join(self.formats)}"
