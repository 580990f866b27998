"""Dense linear layers and the SwiGLU MLP (quantized GPU weights: layers/quant_linear.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from tandem.layers.norm import fused_ops, fused_path
from tandem.ops import reference as ops


class Linear(nn.Module):
    """y = x W^T (+ b); weight [out, in] as in HF checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU feed-forward block (dense layers and shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.gate_up = None  # one layer computing [gate | up] once merged (merge_gate_up)

    def merge_gate_up(self, gate_up: nn.Module) -> None:
        """Serve gate and up from one layer whose output is [gate | up] (one GEMV, not two; the
        runtime merges GPU block layers this way when both share a format)."""
        del self.gate_proj, self.up_proj
        self.gate_up = gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gu = self.gate_up(x)
        if fused_path(gu):
            h = fused_ops().silu_mul(gu.reshape(-1, gu.shape[-1])).view(*gu.shape[:-1], -1)
        else:
            h = ops.silu_mul(*gu.chunk(2, dim=-1))
        return self.down_proj(h)
