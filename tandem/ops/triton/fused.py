"""Fused small ops of a decoder layer's decode step: RMSNorm (+ residual add), RoPE, MLA's cache
write and SwiGLU's silu * up, each one launch where plain torch runs a handful of small kernels
(MoE routing: route.py).

Semantics are exactly tandem.ops.reference's, roundings included: the kernels compute in fp32 and
round to a narrower dtype wherever the reference's torch ops do (round to nearest even).

rms_norm   x [..., N] (stride 1 along N) is seen as rows [A, B, N] with two strides, so a 2-D
           activation with a row stride > N (a split view) and a strided per-head [T, nh, d] view
           (q/k norms) need no copy; more dims are flattened into B. One program per row, the
           whole row in one block (N <= 8192 fits: DeepSeek-V3's hidden size is 7168):
               s = round_x(x + residual)            (only with a residual; also written out)
               y = round_x(s * rsqrt(mean(s^2) + eps))
               out = round_out(weight * y)          out dtype: promote(weight, x)
rope       x [T, H, d] (2-D [T, d] is H = 1; any strides with stride 1 along d, e.g. the rope part
           of q.view(T, nh, dn + dr).split([dn, dr], -1)), cos/sin [T, d/2]. Grid (T, head
           blocks), each program a [BLOCK_H, d/2] tile of pairs: (x[2i], x[2i+1]) interleaved
           (DeepSeek checkpoints), else (x[i], x[i + d/2]). Output: a new contiguous tensor.
mla_cache_write
           kv [T, c + dr] (kv_a_proj_with_mqa's output, stride 1 along the width) ->
           cache[slot_mapping[t]] = cat(rms_norm(kv[:, :c]), rope(kv[:, c:])) in cache's dtype.
           One program per token: the norm and the rotation of one row, stored straight into the
           cache row, replacing norm + rope + cat + cast + index_put. A negative slot writes nothing.
silu_mul   gate_up [T, 2I] (an MLP's merged gate and up projections, stride 1 along the width) ->
           round(round(silu(gate)) * up) [T, I], as reference.silu_mul rounds. Grid (T, I blocks).

No host syncs and grids from shapes only, so every call can be captured in a CUDA graph.

Rounding in Triton's interpreter: it converts fp32 -> bf16 by truncation, not to nearest. Under
it (_INTERPRETED) the kernels round to bf16 with integer ops instead, so the interpreted kernels
round as torch does and the tests can hold them to the same bounds as on a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from tandem.ops.reference import KV_INT8_GROUP, mla_int8_layout

__all__ = ["mla_cache_write", "rms_norm", "rope", "silu_mul"]

_FLOATS = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_MAX_NORM_WIDTH = 8192  # one row in one block


# ---------------------------------------------------------------- shared device functions


@triton.jit
def _round(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 x rounded to DTYPE (to nearest even), returned as fp32; storing it as DTYPE is exact."""
    if DTYPE == tl.float32:
        y = x
    elif EMULATE_BF16 and DTYPE == tl.bfloat16:
        # Round the 16 low bits away, to nearest even (the interpreter's own cast truncates).
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        y = ((u >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(DTYPE).to(tl.float32)
    return y


@triton.jit
def _normalize(x, w_ptr, cols, mask, N, eps, X_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """weight * round_x(x * rsqrt(mean(x^2) + eps)) in fp32, for one row x (fp32, zeros past N)."""
    ms = tl.sum(x * x, axis=0) / N
    y = _round(x * tl.rsqrt(ms + eps), X_DTYPE, EMULATE_BF16)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return w * y


@triton.jit
def _rotate(base, c, s, i, mask, HALF, INTERLEAVED: tl.constexpr):
    """Rotated pairs of one row (or a tile of rows) at `base` (+ pair index i): (o1, o2, col1, col2)."""
    if INTERLEAVED:
        col1 = 2 * i
        col2 = 2 * i + 1
    else:
        col1 = i
        col2 = i + HALF
    x1 = tl.load(base + col1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + col2, mask=mask, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s, col1, col2


# ---------------------------------------------------------------- kernels


@triton.jit
def _rms_norm_kernel(
    x_ptr, x_sa, x_sb,  # [A, B, N], stride 1 along N
    r_ptr, r_sa, r_sb,  # residual, same shape (HAS_RESIDUAL)
    w_ptr,  # [N]
    out_ptr, sum_ptr,  # contiguous [A * B, N]: normed (promoted dtype), x + residual (x's dtype)
    B, N, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a, b = row // B, row % B
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x_dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + a * x_sa + b * x_sb + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + a * r_sa + b * r_sb + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, x_dtype, EMULATE_BF16)  # torch adds x.dtype tensors in fp32 and rounds
        tl.store(sum_ptr + row * N + cols, x.to(x_dtype), mask=mask)
    y = _normalize(x, w_ptr, cols, mask, N, eps, x_dtype, EMULATE_BF16)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * N + cols, _round(y, out_dtype, EMULATE_BF16).to(out_dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, gu_st, out_ptr, I, BLOCK: tl.constexpr, EMULATE_BF16: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gu_ptr + t * gu_st + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * gu_st + I + cols, mask=mask, other=0.0).to(tl.float32)
    s = _round(g / (1.0 + tl.exp(-g)), dtype, EMULATE_BF16)  # torch's silu: fp32, rounded to the dtype
    tl.store(out_ptr + t * I + cols, _round(s * u, dtype, EMULATE_BF16).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    x_ptr, x_st, x_sh,  # [T, H, D], stride 1 along D
    cos_ptr, cos_st, sin_ptr, sin_st,  # [T, D / 2], stride 1 along the pairs
    out_ptr,  # contiguous [T, H, D]
    H, HALF,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    mask = (heads < H)[:, None] & (i < HALF)[None, :]
    c = tl.load(cos_ptr + t * cos_st + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * sin_st + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    heads64 = heads.to(tl.int64)[:, None]
    o1, o2, col1, col2 = _rotate(x_ptr + t * x_st + heads64 * x_sh, c, s, i[None, :], mask, HALF, INTERLEAVED)
    out_dtype = out_ptr.dtype.element_ty
    out = out_ptr + (t * H + heads64) * (2 * HALF)
    tl.store(out + col1, _round(o1, out_dtype, EMULATE_BF16).to(out_dtype), mask=mask)
    tl.store(out + col2, _round(o2, out_dtype, EMULATE_BF16).to(out_dtype), mask=mask)


@triton.jit
def _mla_cache_write_kernel(
    kv_ptr, kv_st,  # [T, C + 2 * HALF], stride 1 along the width
    w_ptr,  # [C]
    cos_ptr, cos_st, sin_ptr, sin_st,  # [T, HALF]
    cache_ptr, cache_st,  # [slots, C + 2 * HALF], stride 1 along the width
    slot_ptr,  # [T]
    eps, C, HALF, scale_col,  # scale_col: int8 rows' first scale byte
    BLOCK_C: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM_DTYPE: tl.constexpr,
    INTERLEAVED: tl.constexpr, EMULATE_BF16: tl.constexpr, INT8: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        kv_dtype = kv_ptr.dtype.element_ty
        cache_dtype = cache_ptr.dtype.element_ty
        row = kv_ptr + t * kv_st
        dst = cache_ptr + slot * cache_st
        # Latent: the reference's rms_norm output (promote(weight, kv) dtype), then cast to the cache.
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
        latent = _round(_normalize(x, w_ptr, cols, mask, C, eps, kv_dtype, EMULATE_BF16), NORM_DTYPE, EMULATE_BF16)
        if INT8:  # reference.mla_int8_rows: a scale per GROUP values, codes rounded half away from zero
            g = tl.arange(0, BLOCK_G)
            in_group = (cols[None, :] // GROUP == g[:, None]) & mask[None, :]  # [BLOCK_G, BLOCK_C]
            amax = tl.max(tl.where(in_group, tl.abs(latent)[None, :], 0.0), axis=1)  # [BLOCK_G]
            scale = tl.where(amax > 0, amax / 127.0, 1.0)
            per_col = tl.sum(tl.where(in_group, scale[:, None], 0.0), axis=0)  # [BLOCK_C]
            tl.store(dst + cols, _int8_code(latent, tl.where(mask, per_col, 1.0)), mask=mask)
            tl.store((dst + scale_col + 4 * g).to(tl.pointer_type(tl.float32), bitcast=True), scale,
                     mask=g < tl.cdiv(C, GROUP))
        else:
            tl.store(dst + cols, _round(latent, cache_dtype, EMULATE_BF16).to(cache_dtype), mask=mask)
        # Rope key: rotated in fp32, rounded to kv's dtype as the reference's apply_rope returns it.
        i = tl.arange(0, BLOCK_HALF)
        pmask = i < HALF
        c = tl.load(cos_ptr + t * cos_st + i, mask=pmask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * sin_st + i, mask=pmask, other=0.0).to(tl.float32)
        o1, o2, col1, col2 = _rotate(row + C, c, s, i, pmask, HALF, INTERLEAVED)
        if INT8:
            o1, o2 = _round(o1, kv_dtype, EMULATE_BF16), _round(o2, kv_dtype, EMULATE_BF16)
            amax = tl.maximum(tl.max(tl.where(pmask, tl.abs(o1), 0.0)), tl.max(tl.where(pmask, tl.abs(o2), 0.0)))
            scale = tl.where(amax > 0, amax / 127.0, 1.0)
            tl.store(dst + C + col1, _int8_code(o1, scale), mask=pmask)
            tl.store(dst + C + col2, _int8_code(o2, scale), mask=pmask)
            tl.store((dst + scale_col + 4 * tl.cdiv(C, GROUP)).to(tl.pointer_type(tl.float32), bitcast=True), scale)
        else:
            o1 = _round(_round(o1, kv_dtype, EMULATE_BF16), cache_dtype, EMULATE_BF16)
            o2 = _round(_round(o2, kv_dtype, EMULATE_BF16), cache_dtype, EMULATE_BF16)
            tl.store(dst + C + col1, o1.to(cache_dtype), mask=pmask)
            tl.store(dst + C + col2, o2.to(cache_dtype), mask=pmask)


@triton.jit
def _int8_code(x, scale):
    """round(x / scale) half away from zero, clamped to +-127, as the uint8 bits of an int8."""
    y = x / scale
    code = tl.minimum(tl.maximum(tl.where(y < 0, -1.0, 1.0) * tl.floor(tl.abs(y) + 0.5), -127.0), 127.0)
    return code.to(tl.int8).to(tl.uint8, bitcast=True)


_INTERPRETED = isinstance(_rms_norm_kernel, InterpretedFunction)  # fixed when the kernels were defined


# ---------------------------------------------------------------- public API


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """reference.rms_norm over the last dim of x [..., N] (N <= 8192), weight [N].

    Returns a new contiguous tensor of x's shape in promote_types(weight, x) dtype. With residual
    (x's shape and dtype) it normalizes s = x + residual (rounded to x's dtype, as torch adds) and
    returns (normed, s)."""
    n = x.shape[-1] if x.dim() else 0
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() < 1 or weight.shape != (n,):
        raise ValueError(f"weight must be [N] for x [..., N], got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if n > _MAX_NORM_WIDTH:
        raise ValueError(f"rms_norm takes rows of up to {_MAX_NORM_WIDTH} elements, got {n}")
    tensors = [x, weight]
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
            )
        tensors.append(residual)
    _check_device(*tensors)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if x.numel():
        x3 = _rows(x)
        r3 = _rows(residual) if residual is not None else x3
        block = triton.next_power_of_2(n)
        with _on(x):
            _rms_norm_kernel[(x3.shape[0] * x3.shape[1],)](
                x3, x3.stride(0), x3.stride(1),
                r3, r3.stride(0), r3.stride(1),
                weight.contiguous(),
                out, total,
                x3.shape[1], n, float(eps),
                BLOCK=block, HAS_RESIDUAL=residual is not None, EMULATE_BF16=_INTERPRETED,
                num_warps=_warps(block),
            )  # fmt: skip
    return (out, total) if residual is not None else out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """reference.apply_rope: x [T, d] or [T, H, d] (any strides with stride 1 along d; more dims
    are flattened into H), cos/sin [T, d/2] -> a new contiguous tensor of x's shape and dtype."""
    _check_float("x", x)
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"x must be [T, ..., d] with d even, got {tuple(x.shape)}")
    half = x.shape[-1] // 2
    _check_angles(cos, sin, x.shape[0], half)
    _check_device(x, cos, sin)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        x3 = _rows(x)
        n_tok, heads = x3.shape[:2]
        block_half = triton.next_power_of_2(half)
        block_h = min(triton.next_power_of_2(heads), max(1, 2048 // block_half))
        with _on(x):
            _rope_kernel[(n_tok, triton.cdiv(heads, block_h))](
                x3, x3.stride(0), x3.stride(1),
                cos, cos.stride(0), sin, sin.stride(0),
                out,
                heads, half,
                BLOCK_H=block_h, BLOCK_HALF=block_half, INTERLEAVED=bool(interleaved),
                EMULATE_BF16=_INTERPRETED, num_warps=_warps(block_h * block_half),
            )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """reference.silu_mul(gate_up[:, :I], gate_up[:, I:]) for gate_up [T, 2I] -> a new [T, I]."""
    _check_float("gate_up", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}")
    _check_device(gate_up)
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    n_tok, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n_tok, inter), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(inter))
        with _on(gate_up):
            _silu_mul_kernel[(n_tok, triton.cdiv(inter, block))](
                gate_up, gate_up.stride(0), out, inter, BLOCK=block, EMULATE_BF16=_INTERPRETED,
                num_warps=_warps(block),
            )  # fmt: skip
    return out


def mla_cache_write(
    kv: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_lora_rank: int,
    interleaved: bool,
) -> None:
    """cache[slot_mapping[t]] = cat(rms_norm(kv[t, :c], norm_weight, eps), rope(kv[t, c:], cos, sin))
    cast to cache's dtype, for each token t, in one launch (c = kv_lora_rank).

    kv [T, c + dr] (row stride may exceed c + dr), norm_weight [c], cos/sin [T, dr/2], cache
    [slots, c + dr] (fp32/bf16/fp16, stride 1 along the width), slot_mapping int32/int64 [T].
    A negative slot writes nothing (padding tokens)."""
    _check_float("kv", kv)
    _check_float("norm_weight", norm_weight)
    if cache.dtype != torch.uint8:  # uint8: int8 rows
        _check_float("cache", cache)
    c = kv_lora_rank
    if kv.dim() != 2 or not 0 < c < kv.shape[1] or (kv.shape[1] - c) % 2:
        raise ValueError(f"kv must be [T, kv_lora_rank={c} + even rope dim], got {tuple(kv.shape)}")
    if c > _MAX_NORM_WIDTH:
        raise ValueError(f"kv_lora_rank up to {_MAX_NORM_WIDTH}, got {c}")
    n_tok, half = kv.shape[0], (kv.shape[1] - c) // 2
    if norm_weight.shape != (c,):
        raise ValueError(f"norm_weight must be [{c}], got {tuple(norm_weight.shape)}")
    int8 = cache.dtype == torch.uint8  # int8 rows (reference.mla_int8_layout)
    groups, scale_col, width = mla_int8_layout(c, kv.shape[1] - c) if int8 else (1, 0, kv.shape[1])
    if cache.dim() != 2 or cache.shape[1] != width:
        raise ValueError(f"cache must be [slots, {width}], got {tuple(cache.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.shape != (n_tok,):
        raise ValueError(
            f"slot_mapping must be int32/int64 [{n_tok}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    _check_angles(cos, sin, n_tok, half)
    _check_device(kv, norm_weight, cos, sin, cache, slot_mapping)
    if kv.stride(1) != 1:
        kv = kv.contiguous()
    if cache.stride(1) != 1:
        raise ValueError("cache rows must be contiguous (stride 1 along the width): it is written in place")
    if n_tok == 0:
        return
    block_c = triton.next_power_of_2(c)
    with _on(kv):
        _mla_cache_write_kernel[(n_tok,)](
            kv, kv.stride(0),
            norm_weight.contiguous(),
            cos, cos.stride(0), sin, sin.stride(0),
            cache, cache.stride(0),
            slot_mapping.contiguous(),
            float(eps), c, half, scale_col,
            BLOCK_C=block_c, BLOCK_HALF=triton.next_power_of_2(half),
            NORM_DTYPE=_FLOATS[torch.promote_types(norm_weight.dtype, kv.dtype)],
            INTERLEAVED=bool(interleaved), EMULATE_BF16=_INTERPRETED, INT8=int8, GROUP=KV_INT8_GROUP,
            BLOCK_G=triton.next_power_of_2(groups), num_warps=_warps(block_c),
        )  # fmt: skip


# ---------------------------------------------------------------- helpers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [A, ..., N] as a 3-D [A, B, N] tensor with stride 1 along N, a view whenever strides allow."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t if t.dim() == 3 else t.flatten(1, -2)  # flatten copies only when the strides need it


def _warps(block: int) -> int:
    return min(8, max(1, block // 512))


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be fp32, bf16 or fp16, got {t.dtype}")


def _check_angles(cos: torch.Tensor, sin: torch.Tensor, n_tok: int, half: int) -> None:
    for name, t in (("cos", cos), ("sin", sin)):
        _check_float(name, t)
        if t.shape != (n_tok, half) or t.stride(1) != 1:
            raise ValueError(
                f"{name} must be [T={n_tok}, d/2={half}] with stride 1 along d/2, "
                f"got {tuple(t.shape)} strides {t.stride()}"
            )


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"the fused Triton kernels (fused.py, route.py, moe.py) run on CUDA tensors, got {device}; on CPU they "
            f"need TRITON_INTERPRET=1 set before tandem.ops.triton.fused is imported (tests only)"
        )


def _on(t: torch.Tensor):
    # Triton launches on the current GPU, which need not be t's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
