"""RMSNorm, optionally fused with the residual add before it.

On a GPU one Triton kernel (ops.triton.fused) replaces the handful of small torch kernels the
reference runs; on the CPU the reference runs. Both round as the reference does.
"""

import torch
from torch import nn

from tandem.ops import reference as ops


def fused_ops():
    """ops.triton.fused, imported on first use (importing triton is slow and needs a GPU or the
    interpreter)."""
    from tandem.ops.triton import fused

    return fused


FUSED_MAX_WIDTH = 8192  # the fused kernel normalizes a row in one block
FUSED_ON_CPU = False  # tests set it: the fused kernels then run on CPU tensors in Triton's interpreter


def fused_path(x: torch.Tensor) -> bool:
    """Whether layers take the fused Triton ops for x: on a GPU (or when tests force them)."""
    return x.is_cuda or FUSED_ON_CPU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`: (norm(x + residual), x + residual), the sum being the new
        residual stream."""
        if fused_path(x) and x.shape[-1] <= FUSED_MAX_WIDTH:
            return fused_ops().rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        s = x + residual
        return ops.rms_norm(s, self.weight, self.eps), s
