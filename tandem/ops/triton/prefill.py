"""Causal prefill attention that also returns the log-sum-exp, flash-attention style, so a long
context can be attended one chunk of keys at a time in bounded memory and the chunks merged
exactly (`reference.merge_attention`).

One sequence: queries q [Tq, nh, d1] at absolute positions q_offset + i, keys k [Tk, nkv, d1] at
k_offset + j, values v [Tk, nkv, dv]; query head h reads kv head h // (nh // nkv). A query sees the
keys at positions <= its own. Optionally the keys carry a part shared by every head, k_pe [Tk, d2],
scored against q_pe [Tq, nh, d2]: MLA's rope key, which is then never copied per head.
Returns o fp32 [Tq, nh, dv] (softmax over this chunk's visible keys) and lse fp32 [Tq, nh], the
natural log of sum(exp(scale * score)) over them; a query that sees no key gets o = 0, lse = -inf.

Data path: grid (cdiv(Tq, BLOCK_M), nh): each program keeps BLOCK_M queries of one head and walks
the key tiles: first the tiles every query of the block sees (no mask), then the few that cross
the diagonal (masked). Online softmax in fp32 with log2(e) folded into the scale; dot products in
the inputs' dtype (bf16/fp16) with fp32 accumulation, or in IEEE fp32 when q is fp32.
"""

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from tandem.ops.triton.attention import _dot, _pow2

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    """Launch shape. The default, for bf16/fp16 at MLA's widths (d1 128, d2 64, dv 128), is untuned
    on a GPU but chosen from sm_90a compiles (ptxas -v, .dev/compile_check.py): 128 queries on 8
    warps fit in 254 registers a thread with no spills and 64 KB of shared memory; 64 queries on 4
    warps with 64-key tiles spilled 184 bytes."""

    block_m: int = 128  # queries per program
    block_n: int = 64  # keys per tile
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"PrefillConfig.{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")


# fp32 (IEEE dot products, for tests and fp32 models): small tiles; 70 KB of shared memory.
FP32_CONFIG = PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_offset: int,
    k_offset: int = 0,
    *,
    q_pe: torch.Tensor | None = None,
    k_pe: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of the module docstring. Every tensor's last dim must be contiguous."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, heads, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (tq, nh, d1), (tk, nkv, dv) = q.shape, v.shape
    if k.shape != (tk, nkv, d1):
        raise ValueError(f"k {tuple(k.shape)} must be [{tk}, {nkv}, {d1}] (v's keys and heads, q's width)")
    if nkv < 1 or nh % nkv:
        raise ValueError(f"query heads ({nh}) must be a positive multiple of kv heads ({nkv})")
    if (q_pe is None) != (k_pe is None):
        raise ValueError("q_pe and k_pe come together")
    d2 = 0
    if q_pe is not None:
        d2 = q_pe.shape[-1]
        if q_pe.shape != (tq, nh, d2) or k_pe.shape != (tk, d2):
            raise ValueError(f"q_pe {tuple(q_pe.shape)} / k_pe {tuple(k_pe.shape)} must be [{tq}, {nh}, d2] / [{tk}, d2]")
    tensors = [t for t in (q, k, v, q_pe, k_pe) if t is not None]
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("every input's last dim must be contiguous")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("q, k, v (and q_pe, k_pe) must be on one device")
    fp32 = q.dtype == torch.float32
    config = config or (FP32_CONFIG if fp32 else PrefillConfig())
    o = torch.zeros(tq, nh, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((tq, nh), float("-inf"), dtype=torch.float32, device=q.device)
    if tq == 0 or tk == 0:
        return o, lse
    qpe, kpe = (q_pe, k_pe) if d2 else (q, k[:, 0])  # placeholders, never read without HAS_PE
    interpreted = isinstance(_prefill_kernel, InterpretedFunction)
    grid = (triton.cdiv(tq, config.block_m), nh)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _prefill_kernel[grid](
            q, q.stride(0), q.stride(1),
            qpe, qpe.stride(0), qpe.stride(1) if d2 else 0,
            k, k.stride(0), k.stride(1),
            kpe, kpe.stride(0),
            v, v.stride(0), v.stride(1),
            o, o.stride(0), o.stride(1),
            lse, lse.stride(0),
            tq, tk, q_offset - k_offset, nh // nkv, scale * _LOG2E,
            d1, d2, dv,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_D1=_pow2(d1), BLOCK_D2=_pow2(d2), BLOCK_DV=_pow2(dv),
            HAS_PE=d2 > 0, FP32=fp32, DOT_PRECISION="ieee" if fp32 else "tf32",
            DOT_UPCAST=interpreted and not fp32, WHILE_LOOP=interpreted,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return o, lse


@triton.jit
def _prefill_kernel(
    q_ptr, q_st, q_sh,  # [Tq, nh, D1]
    qpe_ptr, qpe_st, qpe_sh,  # [Tq, nh, D2]
    k_ptr, k_st, k_sh,  # [Tk, nkv, D1]
    kpe_ptr, kpe_st,  # [Tk, D2], shared by all heads
    v_ptr, v_st, v_sh,  # [Tk, nkv, DV]
    o_ptr, o_st, o_sh,  # fp32 [Tq, nh, DV]
    lse_ptr, lse_st,  # fp32 [Tq, nh], natural log
    n_q, n_k, delta, group, qk_scale,  # query i sees key j iff j <= i + delta
    D1, D2, DV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PE: tl.constexpr, FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    mb, h = tl.program_id(0), tl.program_id(1)
    kvh = h // group
    m0 = mb * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < n_q
    rows64 = rows.to(tl.int64)
    d1 = tl.arange(0, BLOCK_D1)
    q = tl.load(q_ptr + rows64[:, None] * q_st + h * q_sh + d1[None, :],
                mask=row_mask[:, None] & (d1[None, :] < D1), other=0.0)  # [BLOCK_M, BLOCK_D1]
    q = q.to(tl.float32) if FP32 else q
    qpe = q  # placeholder without a shared part
    d2 = tl.arange(0, BLOCK_D2)
    if HAS_PE:
        qpe = tl.load(qpe_ptr + rows64[:, None] * qpe_st + h * qpe_sh + d2[None, :],
                      mask=row_mask[:, None] & (d2[None, :] < D2), other=0.0)
        qpe = qpe.to(tl.float32) if FP32 else qpe
    k_base = k_ptr + kvh.to(tl.int64) * k_sh
    v_base = v_ptr + kvh.to(tl.int64) * v_sh

    # Keys [0, full_hi) are seen by every query of the block (whole tiles only); [full_hi, hi) by some.
    last = tl.minimum(m0 + BLOCK_M, n_q) - 1
    hi = tl.minimum(tl.maximum(last + delta + 1, 0), n_k)
    full_hi = tl.minimum(tl.maximum(m0 + delta + 1, 0), n_k) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if WHILE_LOOP:
        # The interpreter cannot take tensor bounds in range(); compiled code keeps the for loops,
        # which Triton software-pipelines.
        start = full_hi * 0
        while start < full_hi:
            m_i, l_i, acc = _tile(start, rows, m_i, l_i, acc, q, qpe, k_base, k_st, kpe_ptr, kpe_st, v_base, v_st,
                                  n_k, delta, qk_scale, D1, D2, DV, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV,
                                  False, HAS_PE, FP32, DOT_PRECISION, DOT_UPCAST)
            start += BLOCK_N
        while start < hi:
            m_i, l_i, acc = _tile(start, rows, m_i, l_i, acc, q, qpe, k_base, k_st, kpe_ptr, kpe_st, v_base, v_st,
                                  n_k, delta, qk_scale, D1, D2, DV, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV,
                                  True, HAS_PE, FP32, DOT_PRECISION, DOT_UPCAST)
            start += BLOCK_N
    else:
        for start in range(0, full_hi, BLOCK_N):
            m_i, l_i, acc = _tile(start, rows, m_i, l_i, acc, q, qpe, k_base, k_st, kpe_ptr, kpe_st, v_base, v_st,
                                  n_k, delta, qk_scale, D1, D2, DV, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV,
                                  False, HAS_PE, FP32, DOT_PRECISION, DOT_UPCAST)
        for start in range(full_hi, hi, BLOCK_N):
            m_i, l_i, acc = _tile(start, rows, m_i, l_i, acc, q, qpe, k_base, k_st, kpe_ptr, kpe_st, v_base, v_st,
                                  n_k, delta, qk_scale, D1, D2, DV, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV,
                                  True, HAS_PE, FP32, DOT_PRECISION, DOT_UPCAST)

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    dv = tl.arange(0, BLOCK_DV)
    tl.store(o_ptr + rows64[:, None] * o_st + h * o_sh + dv[None, :], o,
             mask=row_mask[:, None] & (dv[None, :] < DV))
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + rows64 * lse_st + h, lse, mask=row_mask)


@triton.jit
def _tile(
    start, rows, m_i, l_i, acc, q, qpe, k_base, k_st, kpe_ptr, kpe_st, v_base, v_st,
    n_k, delta, qk_scale, D1, D2, DV,
    BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, HAS_PE: tl.constexpr, FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Keys start..start+BLOCK_N-1 folded into the online softmax; MASKED: the causal mask and the
    end of the keys apply (unmasked tiles are whole and fully visible)."""
    n = start + tl.arange(0, BLOCK_N)
    n64 = n.to(tl.int64)
    n_ok = n < n_k
    d1 = tl.arange(0, BLOCK_D1)
    # Keys past the end load as zeros, so whatever follows them in memory never reaches the sums.
    k = tl.load(k_base + n64[:, None] * k_st + d1[None, :], mask=n_ok[:, None] & (d1[None, :] < D1), other=0.0)
    k = k.to(tl.float32) if FP32 else k
    s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)  # [BLOCK_M, BLOCK_N]
    if HAS_PE:
        d2 = tl.arange(0, BLOCK_D2)
        kpe = tl.load(kpe_ptr + n64[:, None] * kpe_st + d2[None, :], mask=n_ok[:, None] & (d2[None, :] < D2), other=0.0)
        kpe = kpe.to(tl.float32) if FP32 else kpe
        s += _dot(qpe, tl.trans(kpe), DOT_PRECISION, DOT_UPCAST)
    s = s * qk_scale
    if MASKED:
        s = tl.where(n_ok[None, :] & (n[None, :] <= rows[:, None] + delta), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf: exponentiate against 0 so it stays all zeros.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    dv = tl.arange(0, BLOCK_DV)
    v = tl.load(v_base + n64[:, None] * v_st + dv[None, :], mask=n_ok[:, None] & (dv[None, :] < DV), other=0.0)
    v = v.to(tl.float32) if FP32 else v
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return m_new, l_i, acc

