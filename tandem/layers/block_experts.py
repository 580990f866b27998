"""Routed experts kept in their quantized file blocks (GGUF), dequantized per call, only where routed.

An experts backend like `TorchExperts` (submit/wait), bound by the loader when a GGUF stores a
layer's merged expert tensors quantized. Each projection is a `Blocks`: the raw uint8 blocks
[E, rows, row_bytes] as a view of the mmapped file, and the format's dequantizer (injected by the
loader, so layers need not know the formats). Memory stays at the file's size: no float copy of
the experts exists beyond the few a call dequantizes. Plain torch, correctness first; the C++
CPU engine (ops/cpu.py) takes the same blocks and replaces this.

Data path of one call: ids [T, k] -> tokens grouped by expert -> per routed expert e:
dequantize gate[e], up[e], down[e] -> SwiGLU on its tokens -> weighted add into out [T, H].
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tandem.errors import TandemError
from tandem.layers.moe import MoEConfig
from tandem.ops import reference as ops


@dataclass(frozen=True)
class Blocks:
    """One projection of every expert, as stored: uint8 [E, rows, row_bytes] (or as split rows,
    which `dequantize` takes all the same)."""

    data: torch.Tensor
    format: str  # e.g. "Q4_K"; see tandem.weights.quant.FORMATS
    dequantize: Callable[[torch.Tensor], torch.Tensor]  # uint8 [rows, row_bytes] -> float32 [rows, K]
    split: bool = False  # rows regrouped for the GPU's decode kernels (ops/split_rows.py)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


class BlockExperts(nn.Module):
    """Routed experts computed from quantized blocks; gate/up [E, I, H], down [E, H, I] once dequantized."""

    def __init__(self, cfg: MoEConfig, gate: Blocks, up: Blocks, down: Blocks):
        super().__init__()
        e = cfg.num_experts
        for name, blocks in (("gate", gate), ("up", up), ("down", down)):
            if blocks.data.dtype != torch.uint8 or blocks.data.dim() != 3 or blocks.data.shape[0] != e:
                raise TandemError(
                    f"expert {name} blocks must be uint8 [{e}, rows, row_bytes], got "
                    f"{blocks.data.dtype} {tuple(blocks.data.shape)} — does the config belong to these weights?"
                )
        # Plain attributes, not parameters: the blocks are read-only file data that dtype casts,
        # to_empty and state_dict must leave alone.
        self.cfg, self.gate, self.up, self.down = cfg, gate, up, down

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """out[t] = sum_j weights[t, j] * mlp_{ids[t, j]}(x[t]); x [T, H], ids [T, k] (-1 = none)."""
        return block_moe(x, ids, weights, self.gate, self.up, self.down)

    def wait(self, handle: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return handle if add is None else handle + add  # synchronous: the handle is the result

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def extra_repr(self) -> str:
        formats = "/".join(b.format for b in (self.gate, self.up, self.down))
        return f"experts={self.cfg.num_experts}, formats={formats}, bytes={self.nbytes}"


def expert_weights(gate: Blocks, up: Blocks, down: Blocks, expert: int, dtype: torch.dtype,
                   device) -> tuple[torch.Tensor, ...]:
    """Dequantized (gate [I, H], up [I, H], down [H, I]) of one expert."""
    return tuple(b.dequantize(b.data[expert]).to(device=device, dtype=dtype) for b in (gate, up, down))


def block_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: Blocks, up: Blocks,
              down: Blocks) -> torch.Tensor:
    """reference.moe_experts on blocks [N, rows, row_bytes], dequantizing only the routed experts
    (ids outside 0..N-1 are skipped): BlockExperts' call, and hot experts' (layers/hot_experts.py)
    steps too long for their kernels. Groups tokens on the host (a sync: not for CUDA graphs)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    k = ids.shape[1]
    flat_ids = ids.reshape(-1).long()
    flat_w = weights.reshape(-1)
    valid = (flat_ids >= 0) & (flat_ids < gate.data.shape[0])
    for expert in torch.unique(flat_ids[valid]).tolist():
        slots = (flat_ids == expert).nonzero().flatten()
        tokens = slots // k
        w_gate, w_up, w_down = expert_weights(gate, up, down, expert, x.dtype, x.device)
        y = ops.mlp(x[tokens], w_gate, w_up, w_down)
        out.index_add_(0, tokens, y.float() * flat_w[slots, None].float())
    return out.to(x.dtype)
