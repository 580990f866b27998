"""Prefill attention through torch's fused scaled_dot_product_attention (flash / memory-efficient
kernels on a GPU): the same contract as `reference.attention`, without holding fp32 scores
[heads, Tq, Tk], so long prompt chunks fit in little VRAM."""

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int, window: int | None = None
) -> torch.Tensor:
    """q [Tq, nh, d], k [Tk, nkv, d], v [Tk, nkv, dv] -> [Tq, nh, dv]; query i at position
    q_offset + i sees keys up to it (within `window`); nh a multiple of nkv (grouped-query)."""
    tq, tk = q.shape[0], k.shape[0]
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, d]
    if window is None and q_offset == tk - tq:
        mask = causal_lower_right(tq, tk)
    else:
        pos = q_offset + torch.arange(tq, device=q.device)[:, None]
        key = torch.arange(tk, device=q.device)[None, :]
        mask = key <= pos
        if window is not None:
            mask &= key > pos - window
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)
