"""Split rows: hot experts' GGUF blocks regrouped once, when they are placed on the GPU, for the
decode kernels of ops/triton/moe_q8.py (plain torch, so the memory plan and the runtime use it
without importing triton).

A row of K weights in nb blocks becomes each block's fields one after another — every block's
quants first, then every block's scales — in ggml's byte order inside each field
(tandem/weights/quant*.py are the spec), zero-padded to a multiple of 16 bytes so that every row
starts 16-byte aligned (Q8_0 rows of 34-byte blocks need not). The same bytes: `unsplit_rows`
restores the file's exactly.
    Q4_K  [qs: nb x 128][headers: nb x 16 (d, dmin fp16, 12 bytes of 6-bit scales and mins)]
    Q8_0  [qs: nb x 32 int8][d: nb x fp16][0-14 bytes of padding]
    Q6_K  [ql: nb x 128][qh: nb x 64][scales: nb x 16 int8][d: nb x fp16][padding]
    Q5_0  [qs: nb x 16 (low nibbles: weights 0-15, high: 16-31)][qh: nb x 4 (bit j: weight j's
          fifth bit)][d: nb x fp16][padding]
    Q4_0  [qs: nb x 16 (as Q5_0's)][d: nb x fp16][padding]
    Q5_K  [qs: nb x 128 (as Q4_K's)][qh: nb x 32 (bit j of byte l: group j's weight l)][headers: nb x 16
          (as Q4_K's)]
"""

import torch

# format -> (block weights, block bytes, the block's byte ranges in the order the split row holds them)
LAYOUTS = {
    "Q4_K": (256, 144, ((16, 144), (0, 16))),
    "Q8_0": (32, 34, ((2, 34), (0, 2))),
    "Q6_K": (256, 210, ((0, 128), (128, 192), (192, 208), (208, 210))),
    "Q5_0": (32, 22, ((6, 22), (2, 6), (0, 2))),
    "Q4_0": (32, 18, ((2, 18), (0, 2))),
    "Q5_K": (256, 176, ((48, 176), (16, 48), (0, 16))),
}
SPLIT_FORMATS = tuple(LAYOUTS)


def split_bytes(fmt: str, k: int) -> int:
    """Bytes of a split row of k weights: the file's, rounded up to 16."""
    size, nbytes, _ = LAYOUTS[fmt]
    return -(-(k // size * nbytes) // 16) * 16


def _geometry(data: torch.Tensor, fmt: str) -> tuple[int, int, tuple]:
    if fmt not in LAYOUTS:
        raise ValueError(f"split rows take {', '.join(SPLIT_FORMATS)}, got {fmt!r}")
    if data.dtype != torch.uint8 or data.dim() < 1:
        raise ValueError(f"{fmt} rows must be uint8 [..., row_bytes], got {data.dtype} {tuple(data.shape)}")
    _, nbytes, parts = LAYOUTS[fmt]
    return data.shape[-1] // nbytes, nbytes, parts


def split_rows(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """A file's rows uint8 [..., nb * block_bytes] -> split rows [..., split_bytes] (a new tensor)."""
    nb, nbytes, parts = _geometry(data, fmt)
    if data.shape[-1] != nb * nbytes:
        raise ValueError(f"{fmt} rows must be whole {nbytes}-byte blocks, got {data.shape[-1]} bytes")
    lead = data.shape[:-1]
    blocks = data.reshape(*lead, nb, nbytes)
    pad = split_bytes(fmt, nb * LAYOUTS[fmt][0]) - nb * nbytes
    fields = [blocks[..., a:b].reshape(*lead, nb * (b - a)) for a, b in parts]
    return torch.cat(fields + [data.new_zeros(*lead, pad)], dim=-1)


def unsplit_rows(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """split_rows' inverse: the file's bytes."""
    nb, nbytes, parts = _geometry(data, fmt)
    lead = data.shape[:-1]
    out = torch.empty(*lead, nb, nbytes, dtype=torch.uint8, device=data.device)
    start = 0
    for a, b in parts:
        out[..., a:b] = data[..., start:start + nb * (b - a)].reshape(*lead, nb, b - a)
        start += nb * (b - a)
    return out.reshape(*lead, nb * nbytes)
