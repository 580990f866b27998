"""Hot routed experts kept on the GPU as the model file's blocks (GGUF Q4_K, Q6_K, Q8_0, ...), for
decode-sized batches: three launches, no host sync, grids from shapes only (CUDA-graph capturable).

moe.py's kernels read float copies of the hot experts (bf16: 104 MB a V2-Lite layer for six
experts); these read the blocks as stored (Q4_K_M: ~29 MB), decoding each 256-weight step in
registers (quant_blocks.py), so a token's hot experts cost about a third of the HBM reads and a
budget holds ~3.5x as many experts.

Semantics: ops.reference.moe_experts computed in fp32 on the dequantized weights,
    g = W_gate[e] . x      u = W_up[e] . x      h = silu(g) * u      y = W_down[e] . h
    out[t] = round_x(sum_j y_j * weights[t, j])   (slots j with ids 0..N-1, ascending id: moe.combine)
all in fp32 (x widened from its dtype; h and y kept fp32), so the result differs from the
reference only by fp32 summation order. Ids outside 0..N-1 (-1: the CPU engine's slot) are skipped.

Layouts:
    x        [T, H]  fp32 / bf16 / fp16, stride 1 along H
    ids      [T, k]  int32, k <= 16;  weights [T, k] float
    gate, up uint8 [N, I, row_bytes(H)], down uint8 [N, H, row_bytes(I)]: each expert's rows as
             stored, stride 1 along a row (any expert and row strides); one format per projection
    out      [T, H]  x's dtype

gate/up kernel, grid (T * k, cdiv(I, BLOCK_N)): one program per slot and BLOCK_N rows; one walk
    over H decodes the gate and the up tiles of a step together (twice the loads in flight), then
    h[slot, rows] = silu(g) * u into an fp32 [T * k, I] scratch.
down kernel, grid (T * k, cdiv(H, BLOCK_N)): the same walk over I for the down rows -> y fp32
    [T * k, H]. Then moe.combine adds each token's slots.
BLOCK_N = 16 rows, 4 warps (the tiles its GPU tests ran with). On V2-Lite shapes (H100, one token,
six Q4_K/Q8_0 experts a layer, 26 layers' weights per CUDA-graph replay) they take 50.8 us a layer
(0.75 TB/s of blocks); 8 rows x 2 warps took 42.9 (0.88 TB/s), moe.py's bf16 kernels 56.8 (1.83 TB/s
of their 2.7x bytes). The decode of each step, not HBM, bounds them (benchmarks/hot_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.ops.triton.fused import _check_device, _on
from tandem.ops.triton.moe import check_slots, check_tokens, combine
from tandem.ops.triton.quant import _format_meta, format_of
from tandem.ops.triton.quant_blocks import STEP, decode_step, lo_index, row_pointers

__all__ = ["moe_decode_blocks"]

_BLOCK_N = 16
_NUM_WARPS = 4
_STEP = tl.constexpr(STEP)


@triton.jit
def _step_dot(row, x_row, step, k_lo, K, rmask, n_blocks,
              FMT: tl.constexpr, BLOCK_BYTES: tl.constexpr, HI: tl.constexpr):  # fmt: skip
    """sum over a step's B axis of w * x: [BLOCK_N, A] fp32 (k_lo: [BLOCK_N, A, B] offsets in the step)."""
    lo, hi = decode_step(row, step, rmask, n_blocks, FMT, BLOCK_BYTES)
    k = step * _STEP + k_lo
    x_lo = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
    x_hi = tl.load(x_row + k + HI, mask=k < K, other=0.0).to(tl.float32)
    return tl.sum(lo * x_lo + hi * x_hi, axis=2)


@triton.jit
def _k_offsets(A: tl.constexpr, B: tl.constexpr, FMT: tl.constexpr, rows):
    # x through pointers of the weight tile's full shape: laid out like the decoded weights, so each
    # product stays in the thread that decoded it (see quant.py's _gemv_kernel).
    return lo_index(tl.arange(0, A)[None, :, None], tl.arange(0, B)[None, None, :], FMT) + rows[:, None, None] * 0


@triton.jit
def _slot_rows(ids_ptr, N, BLOCK_N: tl.constexpr):
    """This program's slot, its expert id, its BLOCK_N rows, and whether the id is one of the N."""
    slot = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return slot, e, rows, (e >= 0) & (e < N)


@triton.jit
def _gate_up_kernel(
    x_ptr, x_st, ids_ptr, g_ptr, g_se, g_sr, u_ptr, u_se, u_sr, h_ptr,
    N, I, H, g_blocks, u_blocks, n_steps,
    K: tl.constexpr, BLOCK_N: tl.constexpr,
    G_FMT: tl.constexpr, G_BYTES: tl.constexpr, G_A: tl.constexpr, G_B: tl.constexpr, G_HI: tl.constexpr,
    G_ALIGN: tl.constexpr,
    U_FMT: tl.constexpr, U_BYTES: tl.constexpr, U_A: tl.constexpr, U_B: tl.constexpr, U_HI: tl.constexpr,
    U_ALIGN: tl.constexpr,
):  # fmt: skip
    slot, e, rows, hot = _slot_rows(ids_ptr, N, BLOCK_N)
    if hot:
        rmask = (rows < I)[:, None, None]
        g_row = row_pointers(g_ptr + e * g_se, rows, g_sr, G_ALIGN)
        u_row = row_pointers(u_ptr + e * u_se, rows, u_sr, U_ALIGN)
        g_k = _k_offsets(G_A, G_B, G_FMT, rows)
        u_k = _k_offsets(U_A, U_B, U_FMT, rows)
        x_row = x_ptr + (slot // K) * x_st
        acc_g = tl.zeros([BLOCK_N, G_A], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, U_A], dtype=tl.float32)
        for step in range(0, n_steps):
            acc_g += _step_dot(g_row, x_row, step, g_k, H, rmask, g_blocks, G_FMT, G_BYTES, G_HI)
            acc_u += _step_dot(u_row, x_row, step, u_k, H, rmask, u_blocks, U_FMT, U_BYTES, U_HI)
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + slot * I + rows, h, mask=rows < I)


@triton.jit
def _down_kernel(
    h_ptr, ids_ptr, d_ptr, d_se, d_sr, y_ptr, N, I, H, d_blocks, n_steps,
    BLOCK_N: tl.constexpr, FMT: tl.constexpr, BYTES: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
    HI: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    slot, e, rows, hot = _slot_rows(ids_ptr, N, BLOCK_N)
    if hot:
        rmask = (rows < H)[:, None, None]
        row = row_pointers(d_ptr + e * d_se, rows, d_sr, ALIGN)
        k_lo = _k_offsets(A, B, FMT, rows)
        h_row = h_ptr + slot * I
        acc = tl.zeros([BLOCK_N, A], dtype=tl.float32)
        for step in range(0, n_steps):
            acc += _step_dot(row, h_row, step, k_lo, I, rmask, d_blocks, FMT, BYTES, HI)
        tl.store(y_ptr + slot * H + rows, tl.sum(acc, axis=1), mask=rows < H)


def _meta(prefix: str, fmt, blocks: torch.Tensor) -> dict:
    """quant.py's launch constants of one projection [N > 0, rows, row_bytes], keys prefixed; ALIGN
    also divides the expert stride."""
    meta = _format_meta(fmt, blocks[0])
    meta["ALIGN"] = min(meta["ALIGN"], blocks.stride(0) & -blocks.stride(0) or 16)
    meta["BYTES"] = meta.pop("BLOCK_BYTES")
    return {prefix + key: value for key, value in meta.items()}


def _check_experts(name: str, blocks: torch.Tensor, qtype: str, n_exp: int, rows: int, k: int):
    fmt = format_of(qtype)
    want = k // fmt.block_size * fmt.block_bytes
    ok = blocks.dtype == torch.uint8 and blocks.dim() == 3 and blocks.shape[2] == want and blocks.stride(2) == 1
    if not ok or k % fmt.block_size or blocks.shape[:2] != (n_exp, rows):
        raise ValueError(
            f"{name} must be {fmt.name} blocks uint8 [N={n_exp}, {rows}, {want}] (rows of {k} weights, stride 1 "
            f"along a row), got {blocks.dtype} {tuple(blocks.shape)}"
        )
    return fmt


def moe_decode_blocks(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gate_type: str,
    up_type: str,
    down_type: str,
) -> torch.Tensor:
    """reference.moe_experts in fp32 on blocks: x [T, H], ids int32 [T, k] (k <= 16; ids outside
    0..N-1 skipped), weights [T, k], gate/up uint8 [N, I, row_bytes(H)], down uint8 [N, H,
    row_bytes(I)] in the named GGUF formats -> out [T, H] in x's dtype. See the module docstring;
    raises ValueError for what it does not take."""
    n_tok, hidden = check_tokens(x, weights)
    if down.dim() != 3 or down.shape[1] != hidden:
        raise ValueError(f"down must be blocks [N, H={hidden}, row_bytes], got {tuple(down.shape)}")
    n_exp = down.shape[0]
    if gate.dim() != 3 or gate.shape[0] != n_exp:
        raise ValueError(f"gate must be blocks [N={n_exp}, I, row_bytes], got {tuple(gate.shape)}")
    inter = gate.shape[1]
    g_fmt = _check_experts("gate", gate, gate_type, n_exp, inter, hidden)
    u_fmt = _check_experts("up", up, up_type, n_exp, inter, hidden)
    d_fmt = _check_experts("down", down, down_type, n_exp, hidden, inter)
    top_k = check_slots(ids, weights, n_tok)
    _check_device(x, ids, weights, gate, up, down)
    out = torch.empty(n_tok, hidden, dtype=x.dtype, device=x.device)
    if n_tok == 0 or n_exp == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()
    ids, weights = ids.contiguous(), weights.contiguous()
    h = torch.empty(n_tok * top_k, inter, dtype=torch.float32, device=x.device)
    y = torch.empty(n_tok * top_k, hidden, dtype=torch.float32, device=x.device)
    with _on(x):
        _gate_up_kernel[(n_tok * top_k, triton.cdiv(inter, _BLOCK_N))](
            x, x.stride(0), ids, gate, gate.stride(0), gate.stride(1), up, up.stride(0), up.stride(1), h,
            n_exp, inter, hidden, hidden // g_fmt.block_size, hidden // u_fmt.block_size, triton.cdiv(hidden, STEP),
            K=top_k, BLOCK_N=_BLOCK_N, **_meta("G_", g_fmt, gate), **_meta("U_", u_fmt, up), num_warps=_NUM_WARPS,
        )  # fmt: skip
        _down_kernel[(n_tok * top_k, triton.cdiv(hidden, _BLOCK_N))](
            h, ids, down, down.stride(0), down.stride(1), y, n_exp, inter, hidden, inter // d_fmt.block_size,
            triton.cdiv(inter, STEP), BLOCK_N=_BLOCK_N, **_meta("", d_fmt, down), num_warps=_NUM_WARPS,
        )  # fmt: skip
    combine(y, ids, weights, out, n_exp)
    return out
