"""Matmul, dequantize and embedding on GGUF blocks kept on the GPU, dequantized inside the kernels.

A weight W [N, K] stays as the file stores it: blocks uint8 [N, row_bytes], row n holding output
n's blocks (formats and the decoding of one 256-weight step: quant_blocks.py). No float copy of a
matrix is ever made. Data path of `quant_matmul(x [M, K], blocks)`:

    M == 1     _gemv_kernel: fp32 multiply-add of each decoded tile against x, no tensor cores
    M <= 16    _mma_kernel, 16-token tiles: tl.dot(W tile [rows, 128], x^T [128, 16]) (swap-AB: the
               weights fill the MMA's 64-row side; tokens pad only its narrow side, which costs
               tensor-core cycles that a memory-bound GEMV has to spare, and W is read once)
    M > 16     _mma_kernel, 64/128-token tiles, W tiles re-read from L2 per token tile
    M >= 512   (prefill) W dequantized once into x's dtype, DEQUANT_CHUNK_BYTES of rows at a time, and
               multiplied by torch (cuBLAS on a GPU): the _mma_kernel decodes every W tile once per
               token tile, which at 8K tokens ran V2-Lite's GPU-resident projections at ~140 TFLOP/s
               (96 ms of an 8K prompt's 552 ms on an H100, session 24). H100, Q4_K, ms tiled /
               dequant (session 25): M 256 tiled on every shape tried (V3 q_b 0.13 / 0.39); M 512
               mixed (q_b 0.25 / 0.40, V3 o_proj 0.93 / 0.60); M 2048 dequant 2.4-3.8x faster
    split-K    decode grids too small to fill the GPU split K; partial sums [S, M, N] fp32 are added
               (+ bias) in split order by the last split of each row tile to arrive (ops/triton/
               arrive.py), in the same launch: deterministic. quant_matmul's launches on a device
               must not overlap (they share its arrival counters): one stream runs them

No host syncs and grids from shapes only, so every call is CUDA-graph capturable (after a warm-up
call has compiled the kernel: tile choices are fixed tables, never autotuned at first call).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from tandem.errors import TandemError
from tandem.ops.triton.arrive import arrive, counters
from tandem.ops.triton.quant_blocks import (
    FORMATS,
    STEP,
    Format,
    decode_step,
    lo_index,
    row_pointers,
)

__all__ = ["FORMATS", "Format", "Tiles", "dequantize", "embedding", "format_of", "quant_matmul", "row_bytes"]


@dataclass(frozen=True)
class Tiles:
    """One launch shape: weight rows and tokens per program, warps, software-pipeline stages."""

    rows: int
    tokens: int  # 1: _gemv_kernel (one token per program); >= 16: _mma_kernel
    warps: int
    stages: int = 1


# Fixed tables (checked by compiling for sm_90 offline: registers, shared memory, no spills on Q4_K).
# 16 rows on 2 warps (the same work a thread as 32 on 4): twice the programs, so more of them per SM
# keep bytes in flight. Graph-replayed from HBM on an H100 (session 18, Q4_K, us, 32 rows on 4
# warps -> this): V2-Lite q_proj 10.6 -> 9.4, o_proj 8.9 -> 7.7, shared gate/up 16.7 -> 12.8, V3
# o_proj 131 -> 83; the MMA tiles (64 x 16) were slower on every shape at M = 1.
_GEMV = Tiles(rows=16, tokens=1, warps=2)
# M = 2..16 (batched decode): one wgmma 64 x 16 per half step, 2 stages (3 before; session 19, H100,
# us at M = 16: V2-Lite q_proj 16.1 -> 15.5, shared gate/up 22.0 -> 20.8, V3 q_a 21.6 -> 19.4,
# q_b 42.9 -> 40.9, o_proj 162.7 -> 156.4; V2-Lite kv_a, o_proj and shared down unchanged)
_DECODE = Tiles(rows=64, tokens=16, warps=4, stages=2)
_PREFILL = (  # (shared memory per block needed, tiles), best first
    (200 << 10, Tiles(rows=128, tokens=128, warps=8, stages=2)),  # H100/H200: ~180 KB
    (160 << 10, Tiles(rows=128, tokens=64, warps=8, stages=3)),  # A100: ~160 KB
    (0, Tiles(rows=64, tokens=64, warps=4, stages=2)),  # ~100 KB GPUs
)
_FP32 = Tiles(rows=64, tokens=16, warps=4)  # fp32 x, M > 1: the ieee dot runs on CUDA cores; big tiles spill
_GEMV_MAX_M = 16
DEQUANT_MIN_M = 512  # from this many tokens quant_matmul takes the "dequant" path (module docstring)
DEQUANT_CHUNK_BYTES = 32 << 20  # dequantized rows the "dequant" path holds at once (the memory plan counts them)
_PROGRAMS_PER_SM = 4  # split K until about this many programs per SM stream weights
_MIN_SPLIT_STEPS = 2  # ... giving each split at least this many steps
_MAX_SPLIT = 32
_TABLE = Tiles(rows=32, tokens=1, warps=4)  # dequantize / embedding
_STEP = tl.constexpr(STEP)  # kernels read only constexpr globals


# ---------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton 3.6's interpreter multiplies bf16 bit patterns as integers: give it fp32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:  # fp32 activations keep fp32 accuracy (tf32 would lose ~3 digits)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# Sizes that change from call to call are not specialized on (each value would be a new compile).
_VARYING = ["M", "n_blocks", "n_steps", "steps_per_split", "n_splits", "stride_split"]


@triton.jit
def _sum_splits(part, stride_split, n_splits, mask):
    """The partial sums at part + s * stride_split (every split's program has stored its own),
    added in split order from 0, read through L2 (other programs wrote them)."""
    acc = tl.zeros(part.shape, dtype=tl.float32)
    for s in range(n_splits):
        acc += tl.load(part + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit(do_not_specialize=_VARYING)
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, y_ptr, bias_ptr, cnt_ptr, M, K, N, n_blocks, n_steps, steps_per_split, n_splits,
    stride_xm, stride_wn, stride_om, stride_split,
    FMT: tl.constexpr, BLOCK_BYTES: tl.constexpr, A: tl.constexpr, B: tl.constexpr, HI: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, FINISH: tl.constexpr,
):  # fmt: skip
    """out[m, rows] for one token m (grid axis 2), BLOCK_N rows (axis 0), one split of K (axis 1).

    x is read through pointers of the weight tile's full shape (rows * 0 + k): Triton then lays x
    out like the weight bytes and every product stays in the thread that decoded it (with a
    [1, A, B] x it moved both fp32 tiles through shared memory each step). The repeats hit L1. No
    software pipelining (it would copy that broadcast x to shared memory): a step's loads issue
    together, and several programs per SM keep enough bytes in flight. FINISH (K split): out is
    the fp32 partial sums [splits, M, N]; the last split of (m, rows) to arrive adds them (+ bias)
    into y."""
    pid_n, pid_s, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = (rows < N)[:, None, None]
    row = row_pointers(w_ptr, rows, stride_wn, ALIGN)
    k_lo = lo_index(tl.arange(0, A)[None, :, None], tl.arange(0, B)[None, None, :], FMT)  # [1, A, B]
    k_lo += rows[:, None, None] * 0  # [BLOCK_N, A, B], see above
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, A], dtype=tl.float32)  # summed over B each step, within a thread
    first = pid_s * steps_per_split
    for step in range(first, tl.minimum(first + steps_per_split, n_steps)):
        lo, hi = decode_step(row, step, rmask, n_blocks, FMT, BLOCK_BYTES)
        k = step * _STEP + k_lo
        x_lo = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        x_hi = tl.load(x_row + k + HI, mask=k < K, other=0.0).to(tl.float32)
        acc += tl.sum(lo * x_lo + hi * x_hi, axis=2)
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if FINISH:
        part = out_ptr + m.to(tl.int64) * stride_om + rows
        tl.store(part + pid_s * stride_split, y, mask=rows < N)
        if arrive(cnt_ptr + m * tl.num_programs(0) + pid_n, n_splits):
            y = _sum_splits(part, stride_split, n_splits, rows < N)
            if HAS_BIAS:
                y += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
            tl.store(y_ptr + m.to(tl.int64) * stride_om + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + m.to(tl.int64) * stride_om + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit(do_not_specialize=_VARYING)
def _mma_kernel(
    x_ptr, w_ptr, out_ptr, y_ptr, bias_ptr, cnt_ptr, M, K, N, n_blocks, n_steps, steps_per_split, n_splits,
    stride_xm, stride_wn, stride_om, stride_split,
    FMT: tl.constexpr, BLOCK_BYTES: tl.constexpr, A: tl.constexpr, B: tl.constexpr, HI: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, FINISH: tl.constexpr,
    BLOCK_M: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """y[tokens, rows]^T = W[rows] x[tokens]^T on tensor cores. Grid (token tiles, row tiles,
    splits of K): token tiles vary fastest, so the tiles sharing weight rows run together (L2).
    FINISH: as _gemv_kernel's, per (token tile, row tile)."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = (rows < N)[:, None, None]
    row = row_pointers(w_ptr, rows, stride_wn, ALIGN)
    flat = tl.arange(0, A * B)
    k_lo = lo_index(flat // B, flat % B, FMT)[:, None]  # [128, 1]
    xt = x_ptr + tokens[None, :].to(tl.int64) * stride_xm  # [1, BLOCK_M]
    tmask = tokens[None, :] < M
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    first = pid_s * steps_per_split
    for step in range(first, tl.minimum(first + steps_per_split, n_steps)):
        lo, hi = decode_step(row, step, rmask, n_blocks, FMT, BLOCK_BYTES)
        k = step * _STEP + k_lo
        x_lo = tl.load(xt + k, mask=tmask & (k < K), other=0.0)  # [128, BLOCK_M]
        x_hi = tl.load(xt + k + HI, mask=tmask & (k < K), other=0.0)
        acc = _dot(tl.reshape(lo, [BLOCK_N, A * B]).to(dtype), x_lo, acc, IEEE, UPCAST)
        acc = _dot(tl.reshape(hi, [BLOCK_N, A * B]).to(dtype), x_hi, acc, IEEE, UPCAST)
    at = tokens[None, :].to(tl.int64) * stride_om + rows[:, None]
    mask = tmask & (rows < N)[:, None]
    if FINISH:
        tl.store(out_ptr + at + pid_s * stride_split, acc, mask=mask)
        if arrive(cnt_ptr + pid_m * tl.num_programs(1) + pid_n, n_splits):
            acc = _sum_splits(out_ptr + at, stride_split, n_splits, mask)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + at, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + at, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["R"])
def _rows_kernel(
    ids_ptr, w_ptr, out_ptr, R, V, K, n_blocks, stride_wn, stride_or,
    FMT: tl.constexpr, BLOCK_BYTES: tl.constexpr, A: tl.constexpr, B: tl.constexpr, HI: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    """out[r, one step] = row ids[r] (r itself without GATHER), dequantized. Grid (row tiles, steps)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    step = tl.program_id(1)
    if GATHER:
        src = tl.load(ids_ptr + r, mask=r < R, other=0).to(tl.int64)
        valid = (r < R) & (src >= 0) & (src < V)  # an id out of range reads nothing: a zero row
    else:
        src = r
        valid = r < R
    lo, hi = decode_step(row_pointers(w_ptr, src, stride_wn, ALIGN), step, valid[:, None, None], n_blocks, FMT,
                         BLOCK_BYTES)  # fmt: skip
    k = step * _STEP + lo_index(tl.arange(0, A)[None, :, None], tl.arange(0, B)[None, None, :], FMT)
    out = out_ptr + r.to(tl.int64)[:, None, None] * stride_or + k
    mask = (r < R)[:, None, None] & (k < K)
    tl.store(out, lo.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HI, hi.to(out_ptr.dtype.element_ty), mask=mask)


_INTERPRETED = isinstance(_gemv_kernel, InterpretedFunction)  # fixed when the kernels were defined


def _interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter keeps scalars as 1-element arrays and makes loop bounds with
    int(array), which numpy >= 2.4 refuses; have it take the element. Interpreter only."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "tandem_loop_bounds", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.tandem_loop_bounds = True
    interpreter._patch_lang_tensor = patched


if _INTERPRETED:
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        _interpreter_loop_bounds()


# ---------------------------------------------------------------- public API


def format_of(qtype: str) -> Format:
    """The block format named `qtype` ("Q4_K", any case); a TandemError for anything else."""
    fmt = FORMATS.get(qtype.upper()) if isinstance(qtype, str) else None
    if fmt is None:
        raise TandemError(
            f"GPU quantized kernels take the block formats {', '.join(FORMATS)}, not {qtype!r}; "
            f"keep float weights (F32/F16/BF16) as ordinary tensors"
        )
    return fmt


def row_bytes(qtype: str, k: int) -> int:
    """Bytes one row of `k` weights takes in `qtype`."""
    fmt = format_of(qtype)
    if k <= 0 or k % fmt.block_size:
        raise TandemError(f"{fmt.name} rows hold a positive multiple of {fmt.block_size} weights, not {k}")
    return k // fmt.block_size * fmt.block_bytes


def quant_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: str,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
    split_k: int | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """y = x W^T (+ bias): x [M, K] bf16/fp16/fp32, W as blocks uint8 [N, row_bytes] -> y [M, N] in x's dtype.

    Accumulates in fp32 (bf16/fp16 x: the tensor-core paths round decoded weights to x's dtype).
    `path` ("gemv", "tiled" or "dequant"), `split_k` and `tiles` override the choices made from M,
    the grid and the GPU; they are for tests and tuning. On the "dequant" path a bias is added in
    x's dtype (cuBLAS's epilogue)."""
    fmt = format_of(qtype)
    _check_device(x, blocks)
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TandemError(f"quant_matmul takes x [M, K] in bf16/fp16/fp32, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    n = _check_blocks(blocks, fmt, k)
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point() or bias.device != x.device):
        raise TandemError(f"bias must be a float tensor [{n}] on {x.device}, got {bias.dtype} {tuple(bias.shape)}")
    if path not in (None, "gemv", "tiled", "dequant"):
        raise TandemError(f"quant_matmul path must be 'gemv', 'tiled' or 'dequant', not {path!r}")
    if split_k is not None and split_k < 1:
        raise TandemError(f"split_k must be >= 1, got {split_k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    path = path or ("gemv" if m <= _GEMV_MAX_M else "tiled" if m < DEQUANT_MIN_M else "dequant")
    if path == "dequant" and m and n:
        return _dequant_matmul(x, blocks, fmt, bias, n)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y

    tiles = tiles or _tiles_for(m, path, x)
    grid_m, grid_n, n_steps = triton.cdiv(m, tiles.tokens), triton.cdiv(n, tiles.rows), triton.cdiv(k, STEP)
    splits = split_k or (_pick_split(grid_m * grid_n, n_steps, x.device) if path == "gemv" else 1)
    per_split = triton.cdiv(n_steps, splits)
    splits = triton.cdiv(n_steps, per_split)  # no empty splits
    # Split K: partial sums [splits, M, N] fp32, added by the last split of each group to arrive
    # (a group: one token's, or one token tile's, rows of a program), one counter a group.
    out = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    groups = (m if tiles.tokens == 1 else grid_m) * grid_n
    cnt = counters("quant_matmul", x.device, groups) if splits > 1 else y  # never read unsplit

    bias_arg = bias if bias is not None else y  # never read without HAS_BIAS
    args = (x, blocks, out, y, bias_arg, cnt, m, k, n, k // fmt.block_size, n_steps, per_split, splits,
            x.stride(0), blocks.stride(0), n, m * n)  # fmt: skip
    meta = dict(_format_meta(fmt, blocks), BLOCK_N=tiles.rows, HAS_BIAS=bias is not None, FINISH=splits > 1,
                num_warps=tiles.warps, num_stages=tiles.stages)  # fmt: skip
    if tiles.tokens == 1:
        _gemv_kernel[(grid_n, splits, m)](*args, **meta)
    else:
        _mma_kernel[(grid_m, grid_n, splits)](*args, **meta, BLOCK_M=tiles.tokens, IEEE=x.dtype == torch.float32,
                                              UPCAST=_INTERPRETED)  # fmt: skip
    return y


def _dequant_matmul(x: torch.Tensor, blocks: torch.Tensor, fmt: Format, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """quant_matmul's "dequant" path: W's rows decoded into x's dtype (the rounding the tensor-core
    kernel gives each weight) a chunk at a time, each chunk multiplied by torch."""
    b = bias.to(x.dtype) if bias is not None else None
    rows = max(16, DEQUANT_CHUNK_BYTES // (x.shape[1] * x.element_size()) // 16 * 16)  # 16: the blocks' alignment
    if rows >= n:
        return torch.nn.functional.linear(x, _rows(None, blocks, fmt, x.dtype, n, "dequantize"), b)
    y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = _rows(None, blocks[r0:r1], fmt, x.dtype, r1 - r0, "dequantize")
        y[:, r0:r1] = torch.nn.functional.linear(x, w, b[r0:r1] if b is not None else None)
        del w  # one chunk held at a time
    return y


def dequantize(blocks: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [N, row_bytes] -> weights [N, K] in `dtype`; fp32 is bit-equal to the numpy codecs."""
    fmt = format_of(qtype)
    _check_device(blocks)
    return _rows(None, blocks, fmt, dtype, blocks.shape[0] if blocks.dim() == 2 else 0, "dequantize")


def embedding(ids: torch.Tensor, blocks: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` [T] (int32/int64) of the quantized table blocks [V, row_bytes] -> [T, K] in `dtype`.

    On CUDA no host sync checks the ids (that would break CUDA graphs): an id outside [0, V) gives
    a zero row, never a read out of bounds. On CPU tensors it raises."""
    fmt = format_of(qtype)
    _check_device(ids, blocks)
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise TandemError(f"embedding takes ids [T] int32/int64, got {ids.dtype} {tuple(ids.shape)}")
    if ids.device.type == "cpu" and ids.numel() and blocks.dim() == 2:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= blocks.shape[0]:
            raise TandemError(f"token ids {low}..{high} outside the embedding table's {blocks.shape[0]} rows")
    return _rows(ids.contiguous(), blocks, fmt, dtype, ids.shape[0], "embedding")


# ---------------------------------------------------------------- helpers


def _rows(ids, blocks, fmt: Format, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TandemError(f"{what} writes bf16/fp16/fp32, not {dtype}")
    k = _check_blocks(blocks, fmt, None)
    out = torch.empty((count, k), dtype=dtype, device=blocks.device)
    if count == 0:
        return out
    grid = (triton.cdiv(count, _TABLE.rows), triton.cdiv(k, STEP))
    # No fused multiply-add: fp32 results must round as the numpy codecs' separate ops do.
    _rows_kernel[grid](
        ids if ids is not None else blocks, blocks, out, count, blocks.shape[0], k, k // fmt.block_size,
        blocks.stride(0), k, **_format_meta(fmt, blocks), BLOCK_R=_TABLE.rows, GATHER=ids is not None,
        num_warps=_TABLE.warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _format_meta(fmt: Format, blocks: torch.Tensor) -> dict:
    a, b = fmt.tile
    # Largest power of two dividing every block's address (<= 16: wider loads do not exist);
    # one value per format in practice, so no extra compiles.
    align = min([16, *(v & -v for v in (fmt.block_bytes, blocks.data_ptr(), blocks.stride(0)) if v)])
    return dict(FMT=fmt.code, BLOCK_BYTES=fmt.block_bytes, A=a, B=b, HI=fmt.hi, ALIGN=align)


def _check_blocks(blocks: torch.Tensor, fmt: Format, k: int | None) -> int:
    """Validate blocks [N, row_bytes]; returns N when x gives K (matmul), else K."""
    ok = blocks.dtype == torch.uint8 and blocks.dim() == 2 and blocks.stride(-1) == 1
    if k is not None:
        if k <= 0 or k % fmt.block_size:
            raise TandemError(f"{fmt.name} weights need K a positive multiple of {fmt.block_size}; x has K = {k}")
        want = k // fmt.block_size * fmt.block_bytes
        if not ok or blocks.shape[1] != want:
            raise TandemError(
                f"{fmt.name} blocks of a weight with K = {k} must be uint8 [N, {want}] with contiguous rows, got "
                f"{blocks.dtype} {tuple(blocks.shape)}; check the tensor's format and that it belongs to this layer"
            )
        return blocks.shape[0]
    if not ok or blocks.shape[1] == 0 or blocks.shape[1] % fmt.block_bytes:
        raise TandemError(
            f"{fmt.name} blocks must be uint8 [rows, a multiple of {fmt.block_bytes} bytes] with contiguous rows, "
            f"got {blocks.dtype} {tuple(blocks.shape)}; check the tensor's format"
        )
    return blocks.shape[1] // fmt.block_bytes * fmt.block_size


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise TandemError(f"tensors on different devices: {[str(t.device) for t in tensors]}; put them together")
    if device.type != "cuda" and not _INTERPRETED:
        raise TandemError(
            f"the Triton quantized kernels run on CUDA tensors, got {device}; on CPU they need "
            f"TRITON_INTERPRET=1 set before tandem.ops.triton.quant is imported (tests only)"
        )


def _tiles_for(m: int, path: str, x: torch.Tensor) -> Tiles:
    if path == "gemv" and m == 1:
        return _GEMV
    if x.dtype == torch.float32:
        return _FP32
    if path == "gemv":
        return _DECODE
    smem = _shared_memory(x.device)
    tiles = next(t for need, t in _PREFILL if smem >= need)
    return replace(tiles, tokens=max(16, min(tiles.tokens, triton.next_power_of_2(m))))


def _shared_memory(device: torch.device) -> int:
    """Shared memory one block may use (device properties are cached by torch: no sync)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no limit
    props = torch.cuda.get_device_properties(device)
    known = getattr(props, "shared_memory_per_block_optin", 0)
    if known:
        return known
    return {(9, 0): 227 << 10, (8, 0): 163 << 10}.get((props.major, props.minor), 99 << 10)


def _pick_split(programs: int, n_steps: int, device: torch.device) -> int:
    """Split K until about _PROGRAMS_PER_SM programs per SM stream weights: a few programs per SM
    cannot keep enough bytes in flight to reach HBM bandwidth."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(_PROGRAMS_PER_SM * sms, programs)
    return max(1, min(want, n_steps // _MIN_SPLIT_STEPS, _MAX_SPLIT))
