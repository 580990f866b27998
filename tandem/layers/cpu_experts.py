"""Routed experts on the C++ CPU engine (tandem._C through ops.cpu): the default experts backend.

Bound to one MoE layer when the model is placed: the engine holds the layer's weights (repacked
from the checkpoint's float tensors or the GGUF file's blocks), this object holds the engine and
the layer id. submit() starts the engine and returns at once, so the shared experts (GPU or CPU)
run meanwhile; wait() collects [T, H].
"""

import torch
from torch import nn

from tandem.ops import cpu

# The engine computes in fp32 and reads x as fp32 or bf16.
_ENGINE_DTYPES = (torch.float32, torch.bfloat16)


class CpuExperts(nn.Module):
    def __init__(self, engine: "cpu.Engine", layer: int, formats: tuple[str, str, str]):
        super().__init__()
        self.engine, self.layer, self.formats = engine, layer, formats
        # Output rows reused across calls (grown to the largest step seen), so the hot path allocates
        # nothing; a layer's output is consumed (added to the residual) before its next call.
        self._out = torch.empty(0)

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
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

    def wait(self, pending) -> torch.Tensor:
        handle, dtype, device = pending
        return cpu.wait(self.engine, handle).to(device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.engine.layer_info(self.layer)["bytes"]

    def extra_repr(self) -> str:
        return f"layer={self.layer}, formats={'/'.join(self.formats)}"
