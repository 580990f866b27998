"""Routed experts held on the GPU ("hot experts") for decode-sized batches: three launches, no host
sync, grids from shapes only, so a call can be captured in a CUDA graph.

Semantics are tandem.ops.reference.moe_experts', roundings included: every matrix product
accumulates in fp32 and is rounded to the weights' dtype W once, as F.linear returns it, and the
kernels round to W wherever the reference's torch ops do (round to nearest even):
    g = round_W(w_gate[e] . x)      u = round_W(w_up[e] . x)      h = round_W(round_W(silu(g)) * u)
    y = round_W(w_down[e] . h)      out[t] = round_x(sum_j fp32(y_j) * weights[t, j])
with the sum over the slots j of token t whose id is in 0..N-1, taken in the reference's order:
ascending expert id, then slot index among equal ids (a stable sort), the sum starting from 0. The reference's own fp32
summation order inside a dot product is its BLAS's; ours is below. On a GPU the compiler may fuse
a multiply and the following add (fma).

Layouts:
    x        [T, H]     fp32 / bf16 / fp16, stride 1 along H. When x.dtype != W it is rounded to W
                        first (what moe_experts(x.to(W), ...) computes); the output keeps x's dtype,
                        so its fp32 sum is rounded to x.dtype, not to W.
    ids      [T, k]     int32, k <= 16. Ids outside 0..N-1 (-1: the slot is computed elsewhere, e.g.
                        by the CPU engine) are skipped. Values are not checked on the host (that
                        would be a sync): an id >= N is skipped too, where the reference would fail.
    weights  [T, k]     fp32 (bf16 / fp16 are widened to fp32, as the reference does).
    w_gate, w_up [N, I, H], w_down [N, H, I]: one float dtype W for all three, stride 1 along the
                        last dim (any expert and row strides: gate and up may be views of one fused
                        [N, 2I, H] tensor).
    out      [T, H]     x's dtype, a new contiguous tensor.

gate/up kernel, grid (T * k, cdiv(I, BLOCK_I)): one program per slot and BLOCK_I rows of the
    expert's gate and up projections. It reads its slot's id and does nothing more for a skipped
    slot; else it loops over H in BLOCK_H columns, accumulating w * x tiles in fp32 (one reduction
    at the end), and writes h[slot, rows] (W-rounded, stored in W: exact) into a [T * k, I] scratch.
down kernel, grid (T * k, cdiv(H, BLOCK_D)): one program per slot and BLOCK_D rows of its expert's
    down projection: accumulates w_down[e] . h[slot] over I in BLOCK_C columns, rounds to W and
    writes y[slot, rows] (stored in W: exact) into a [T * k, H] scratch. Every slot's rows at once:
    one program per token looping over its slots (until session 10) left V2-Lite 128 programs of up
    to 36 serial loads each, 22 us a layer for 1.7 hot slots on an H100 (measured), about 75 at
    k = 6: twice the gate/up kernel's time for half its bytes.
combine kernel, grid (T, cdiv(H, BLOCK_O)): one program per token and BLOCK_O output columns. It
    visits the token's slots in the reference's order (k rounds of min over keys id * BLOCK_K + slot,
    no sort), adds each valid slot's y times its fp32 weight in fp32, rounds to x.dtype and stores.
    No atomics: the result is deterministic.

Tiles: BLOCK_I = 16 rows x BLOCK_H = 256 columns (gate and up: one 512-byte row chunk per warp
and step in bf16) and BLOCK_D = 16 rows x BLOCK_C = 256 columns; smaller powers of two for narrow
matrices; masks for any H and I. Untuned guesses for decode on an H200 (DeepSeek-V3: H 7168, I 2048:
128 gate/up and 448 down programs per computed slot; V2-Lite H 2048, I 1408: 88 and 128). Every
computed slot reads its expert's weights, so tokens sharing an expert read it again: the kernels
are for a few tokens, not prefill.

Rounding in Triton's interpreter: it converts fp32 -> bf16 by truncation; the kernels round with
fused._round, which under it (_INTERPRETED) rounds to nearest even with integer ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.ops.triton.fused import _INTERPRETED, _check_device, _check_float, _on, _round

__all__ = ["combine", "hot_split", "moe_decode"]

_MAX_SLOTS = 16  # k: a token's slots in one block of the combine kernel
_BLOCK_I, _BLOCK_H = 16, 256  # gate/up: rows of I x columns of H per step
_BLOCK_D, _BLOCK_C = 16, 256  # down: rows of H x columns of I per step
_BLOCK_O = 1024  # combine: output columns per program
_NUM_WARPS = 4


# ---------------------------------------------------------------- kernels


@triton.jit
def _gate_up_kernel(
    x_ptr, x_st,  # [T, H], stride 1 along H
    ids_ptr,  # contiguous [T * K] int32
    wg_ptr, wg_se, wg_sr,  # [N, I, H], stride 1 along H
    wu_ptr, wu_se, wu_sr,  # [N, I, H], stride 1 along H
    h_ptr,  # contiguous [T * K, I] in W
    N, I, H,
    K: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    if (e >= 0) & (e < N):
        w_dtype = wg_ptr.dtype.element_ty
        t = slot // K
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        rmask = rows < I
        rows64 = rows.to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK_H)
        g_base = wg_ptr + e * wg_se + rows64 * wg_sr
        u_base = wu_ptr + e * wu_se + rows64 * wu_sr
        acc_g = tl.zeros([BLOCK_I, BLOCK_H], tl.float32)
        acc_u = tl.zeros([BLOCK_I, BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            c = h0 + cols
            cmask = c < H
            x = tl.load(x_ptr + t * x_st + c, mask=cmask, other=0.0).to(tl.float32)
            if x_ptr.dtype.element_ty != w_dtype:
                x = _round(x, w_dtype, EMULATE_BF16)  # x in W, as the reference's F.linear sees it
            x = x[None, :]
            m = rmask[:, None] & cmask[None, :]
            wg = tl.load(g_base + c[None, :], mask=m, other=0.0).to(tl.float32)
            wu = tl.load(u_base + c[None, :], mask=m, other=0.0).to(tl.float32)
            acc_g += wg * x
            acc_u += wu * x
        g = _round(tl.sum(acc_g, axis=1), w_dtype, EMULATE_BF16)
        u = _round(tl.sum(acc_u, axis=1), w_dtype, EMULATE_BF16)
        act = _round(g / (1.0 + tl.exp(-g)), w_dtype, EMULATE_BF16)  # F.silu in W
        h = _round(act * u, w_dtype, EMULATE_BF16)
        tl.store(h_ptr + slot * I + rows, h.to(h_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _down_kernel(
    h_ptr,  # contiguous [T * K, I] in W
    ids_ptr,  # contiguous [T * K] int32
    wd_ptr, wd_se, wd_sr,  # [N, H, I], stride 1 along I
    y_ptr,  # contiguous [T * K, H] in W
    N, I, H,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    if (e >= 0) & (e < N):
        rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < H
        cols = tl.arange(0, BLOCK_C)
        base = wd_ptr + e * wd_se + rows.to(tl.int64)[:, None] * wd_sr
        h_row = h_ptr + slot * I
        acc = tl.zeros([BLOCK_D, BLOCK_C], tl.float32)
        for c0 in range(0, I, BLOCK_C):
            c = c0 + cols
            cmask = c < I
            h = tl.load(h_row + c, mask=cmask, other=0.0).to(tl.float32)
            w = tl.load(base + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += w * h[None, :]
        y = _round(tl.sum(acc, axis=1), wd_ptr.dtype.element_ty, EMULATE_BF16)  # F.linear's output in W
        tl.store(y_ptr + slot * H + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _combine_kernel(
    y_ptr,  # contiguous [T * K, H] in W
    ids_ptr, weights_ptr,  # contiguous [T, K]: int32, float
    out_ptr,  # contiguous [T, H] in x's dtype
    N, H,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < H
    # The reference adds experts in ascending id order (a stable sort of the slots): key id * BLOCK_K
    # + slot, smallest first; skipped slots never come up.
    j = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + t * K + j, mask=j < K, other=-1).to(tl.int64)
    beyond = N * BLOCK_K  # past every valid key
    key = tl.where((ids >= 0) & (ids < N), ids * BLOCK_K + j, beyond)
    out = tl.zeros([BLOCK], tl.float32)
    for _ in range(K):
        first = tl.min(key, axis=0)
        if first < beyond:
            s = first % BLOCK_K
            wt = tl.load(weights_ptr + t * K + s).to(tl.float32)
            y = tl.load(y_ptr + (t * K + s) * H + rows, mask=rmask, other=0.0).to(tl.float32)
            out += y * wt
        key = tl.where(key == first, beyond, key)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + t * H + rows, _round(out, out_dtype, EMULATE_BF16).to(out_dtype), mask=rmask)


@triton.jit
def _hot_split_kernel(
    ids_ptr,  # contiguous [S] int32 or int64 (S = T * k)
    lookup_ptr,  # [N + 1] int64: an expert's slot among the hot ones, -1 if cold; entry N for id -1
    tally_ptr,  # [N + 1] int64 routing counts, entry N counting padding ids
    cold_ptr, local_ptr,  # contiguous [S] int32 outputs
    S, N,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < S
    e = tl.load(ids_ptr + i, mask=m, other=-1).to(tl.int64)
    flat = tl.where((e >= 0) & (e < N), e, N)
    tl.atomic_add(tally_ptr + flat, 1, mask=m)  # integer counts: the order of adds does not matter
    local = tl.load(lookup_ptr + flat, mask=m, other=-1)
    tl.store(cold_ptr + i, tl.where(local >= 0, -1, e).to(tl.int32), mask=m)
    tl.store(local_ptr + i, local.to(tl.int32), mask=m)


# ---------------------------------------------------------------- public API


def moe_decode(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """reference.moe_experts in three launches: x [T, H], ids int32 [T, k] (k <= 16; ids outside
    0..N-1 are skipped), weights [T, k], w_gate/w_up [N, I, H], w_down [N, H, I] (one dtype W) ->
    out [T, H] in x's dtype. x of another dtype than W is rounded to W first. See the module
    docstring; raises ValueError for what it does not take."""
    for name, t in (("x", x), ("weights", weights), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        _check_float(name, t)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    n_tok, hidden = x.shape
    if w_gate.dim() != 3 or w_gate.shape[2] != hidden or w_gate.shape[0] == 0 or w_gate.shape[1] == 0:
        raise ValueError(f"w_gate must be [N, I, H={hidden}] with N, I > 0, got {tuple(w_gate.shape)}")
    n_exp, inter = w_gate.shape[:2]
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must be [N={n_exp}, I={inter}, H={hidden}] like w_gate, got {tuple(w_up.shape)}")
    if w_down.shape != (n_exp, hidden, inter):
        raise ValueError(f"w_down must be [N={n_exp}, H={hidden}, I={inter}], got {tuple(w_down.shape)}")
    if not w_gate.dtype == w_up.dtype == w_down.dtype:
        raise ValueError(
            f"w_gate, w_up and w_down must share one dtype, got {w_gate.dtype}, {w_up.dtype}, {w_down.dtype}"
        )
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have stride 1 along its last dim (not copied), got strides {t.stride()}")
    top_k = check_slots(ids, weights, n_tok)
    _check_device(x, ids, weights, w_gate, w_up, w_down)
    out = torch.empty(n_tok, hidden, dtype=x.dtype, device=x.device)
    if n_tok == 0 or hidden == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    ids = ids.contiguous()
    weights = weights.contiguous()
    h = torch.empty(n_tok * top_k, inter, dtype=w_gate.dtype, device=x.device)
    y = torch.empty(n_tok * top_k, hidden, dtype=w_gate.dtype, device=x.device)
    block_i = min(_BLOCK_I, triton.next_power_of_2(inter))
    block_h = min(_BLOCK_H, triton.next_power_of_2(hidden))
    block_d = min(_BLOCK_D, triton.next_power_of_2(hidden))
    block_c = min(_BLOCK_C, triton.next_power_of_2(inter))
    with _on(x):
        _gate_up_kernel[(n_tok * top_k, triton.cdiv(inter, block_i))](
            x, x.stride(0),
            ids,
            w_gate, w_gate.stride(0), w_gate.stride(1),
            w_up, w_up.stride(0), w_up.stride(1),
            h,
            n_exp, inter, hidden,
            K=top_k, BLOCK_I=block_i, BLOCK_H=block_h, EMULATE_BF16=_INTERPRETED, num_warps=_NUM_WARPS,
        )  # fmt: skip
        _down_kernel[(n_tok * top_k, triton.cdiv(hidden, block_d))](
            h,
            ids,
            w_down, w_down.stride(0), w_down.stride(1),
            y,
            n_exp, inter, hidden,
            BLOCK_D=block_d, BLOCK_C=block_c, EMULATE_BF16=_INTERPRETED, num_warps=_NUM_WARPS,
        )  # fmt: skip
    combine(y, ids, weights, out, n_exp)
    return out


def combine(y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, n_exp: int) -> None:
    """out[t] = round(sum over t's valid slots j, ascending id: fp32(y[t * k + j]) * weights[t, j]):
    y [T * k, H] (any float dtype), contiguous ids int32 / weights [T, k], out [T, H] contiguous.
    The last launch of every hot-experts path (moe_quant.py's too)."""
    n_tok, top_k = ids.shape
    hidden = out.shape[1]
    block_o = min(_BLOCK_O, triton.next_power_of_2(hidden))
    with _on(out):
        _combine_kernel[(n_tok, triton.cdiv(hidden, block_o))](
            y, ids, weights, out, n_exp, hidden,
            K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK=block_o, EMULATE_BF16=_INTERPRETED,
            num_warps=_NUM_WARPS,
        )  # fmt: skip


def check_tokens(x: torch.Tensor, weights: torch.Tensor) -> tuple[int, int]:
    """Validate x [T, H] and the routing weights' dtype of a hot-experts call on blocks; returns (T, H)."""
    _check_float("x", x)
    _check_float("weights", weights)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def check_slots(ids: torch.Tensor, weights: torch.Tensor, n_tok: int) -> int:
    """Validate ids int32 [T, k] (1 <= k <= 16) and weights [T, k] of a hot-experts call; returns k."""
    if ids.dtype != torch.int32:
        raise ValueError(f"ids must be int32, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != n_tok or not 1 <= ids.shape[1] <= _MAX_SLOTS:
        raise ValueError(f"ids must be [T={n_tok}, k] with 1 <= k <= {_MAX_SLOTS}, got {tuple(ids.shape)}")
    if weights.shape != ids.shape:
        raise ValueError(f"weights must be [T={n_tok}, k={ids.shape[1]}] like ids, got {tuple(weights.shape)}")
    return ids.shape[1]


def hot_split(ids: torch.Tensor, lookup: torch.Tensor, tally: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.hot_experts.HotExperts.split in one launch: ids [T, k] (int32/int64; -1 padding),
    lookup int64 [N + 1] (an expert's index among the hot ones, -1 for a cold one and for the
    padding entry N), tally int64 [N + 1] (routing counts, added to in place; padding and ids
    outside 0..N-1 count in entry N) -> (cold ids with the hot slots -1, local hot index with the
    cold slots -1), both int32 [T, k]."""
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32/int64 [T, k], got {ids.dtype} {tuple(ids.shape)}")
    if lookup.dtype != torch.int64 or tally.dtype != torch.int64 or lookup.dim() != 1 or lookup.shape != tally.shape:
        raise ValueError(f"lookup and tally must be int64 [N + 1], got {tuple(lookup.shape)} and {tuple(tally.shape)}")
    if not (lookup.is_contiguous() and tally.is_contiguous()):
        raise ValueError("lookup and tally must be contiguous")
    _check_device(ids, lookup, tally)
    ids = ids.contiguous()
    cold = torch.empty(ids.shape, dtype=torch.int32, device=ids.device)
    local = torch.empty(ids.shape, dtype=torch.int32, device=ids.device)
    n = ids.numel()
    if n:
        block = min(1024, triton.next_power_of_2(n))
        with _on(ids):
            _hot_split_kernel[(triton.cdiv(n, block),)](ids, lookup, tally, cold, local, n, lookup.numel() - 1,
                                                       BLOCK=block, num_warps=4)
    return cold, local
