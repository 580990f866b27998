"""Block-scaled FP8 weights, as DeepSeek-V3/R1 ship them.

A quantized `X.weight` is float8 [out, in]; beside it `X.weight_scale_inv` is fp32
[ceil(out/bo), ceil(in/bi)], one scale per (bo x bi) block, edge blocks partial.
The real weight is `weight.float() * scale` (the name says "inv" because the scale
undoes the quantizer's division).
"""

from __future__ import annotations

import math

import torch

from tandem.errors import TandemError


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale tensor that goes with a fp8 weight of `shape` and `block`."""
    out_features, in_features = shape
    return math.ceil(out_features / block[0]), math.ceil(in_features / block[1])


def _spans(size: int, block: int) -> list[tuple[slice, int, int, slice]]:
    """Split one axis into (full blocks, partial tail): (elements, n_blocks, block_len, scale rows)."""
    full = size // block
    spans = []
    if full:
        spans.append((slice(0, full * block), full, block, slice(0, full)))
    if size % block:
        spans.append((slice(full * block, size), 1, size - full * block, slice(full, full + 1)))
    return spans


def dequant_fp8_blocks(
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize a block-scaled fp8 weight [out, in] to `dtype`.

    Vectorized: each region of whole blocks (and each partial edge) is viewed as
    [n_row_blocks, rows, n_col_blocks, cols] and scaled in place in one broadcast multiply,
    so at most four multiplies run whatever the shape, and no expanded scale matrix is built.
    """
    if w.dim() != 2:
        raise TandemError(f"fp8 weight has shape {tuple(w.shape)}; block-scaled fp8 needs a 2-D weight")
    expected = fp8_scale_shape(tuple(w.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise TandemError(
            f"fp8 scale has shape {tuple(scale_inv.shape)} but a {tuple(w.shape)} weight with "
            f"{block[0]}x{block[1]} blocks needs {expected} — check weight_block_size in config.json"
        )
    # fp32 math whatever the output dtype, as the reference implementation does.
    result = w.to(torch.float32)  # [out, in]; a fresh tensor we may scale in place
    scale = scale_inv.to(torch.float32)
    for rows, n_rb, row_len, scale_rows in _spans(w.shape[0], block[0]):
        for cols, n_cb, col_len, scale_cols in _spans(w.shape[1], block[1]):
            # Splitting a dimension is always a view, so mul_ writes into `result`.
            region = result[rows, cols].unflatten(1, (n_cb, col_len)).unflatten(0, (n_rb, row_len))
            region.mul_(scale[scale_rows, scale_cols][:, None, :, None])
    return result if dtype == torch.float32 else result.to(dtype)
