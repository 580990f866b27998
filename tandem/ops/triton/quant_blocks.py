"""GGUF block formats as the Triton kernels see them: the format table and the decoding of one step.

A row of K weights is K / block_size blocks in ggml's byte layout (the numpy codecs in
tandem/weights/quant*.py are the spec; these decoders re-derive the layouts and are tested
against them bit for bit). Kernels walk K in steps of 256 weights: one K-quant super-block, or 8
blocks of 32. `decode_step` returns a step as two fp32 tiles `lo`, `hi` [rows, A, B] (A * B = 128)
in the order the bytes hold them: each byte carries a `lo` weight (its low nibble, or the first
half of a Q8_0 block) and a `hi` weight `hi` elements further on. `lo_index` says where each `lo`
weight sits in the step, so a kernel gathers its activations in the same order and never shuffles
a weight tile into element order.

Scales are read byte by byte (Q8_0/Q5_0/Q6_K blocks are 34/22/210 bytes: their fp16 fields are
not aligned); the packed weights go in one contiguous tile per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import triton
import triton.language as tl

STEP = 256  # weights of K per kernel step
_Q8_0, _Q4_0, _Q5_0, _Q4_K, _Q5_K, _Q6_K = (tl.constexpr(i) for i in range(6))


@dataclass(frozen=True)
class Format:
    """A block format as the kernels see it: geometry plus the tile shape of one step."""

    name: str
    code: int  # the kernels' constexpr switch
    block_size: int  # weights per block
    block_bytes: int
    tile: tuple[int, int]  # (A, B): a step's `lo` (and `hi`) weights per row, as decoded
    hi: int  # element offset of a byte's `hi` weight from its `lo` weight


FORMATS = MappingProxyType({
    f.name: f
    for f in (
        Format("Q8_0", 0, 32, 34, (8, 16), 16),
        Format("Q4_0", 1, 32, 18, (8, 16), 16),
        Format("Q5_0", 2, 32, 22, (8, 16), 16),
        Format("Q4_K", 3, 256, 144, (4, 32), 32),
        Format("Q5_K", 4, 256, 176, (4, 32), 32),
        Format("Q6_K", 5, 256, 210, (8, 16), 64),
    )
})


# ---------------------------------------------------------------- decoding one step


@triton.jit
def _u8(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, mask):
    """The little-endian fp16 at ptr (any alignment: blocks of 34 or 210 bytes leave it odd-placed)."""
    bits = _u8(ptr, mask) | (_u8(ptr + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _to_float(q, offset: tl.constexpr):
    """float(q - offset) for 0 <= q < 2**23, exactly: q in the mantissa of 2**23, then one subtract.

    Two full-rate ops instead of an int->float convert, which runs at 1/4 rate on sm_80/sm_90."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _k_scale_min(scales, j, mask):
    """Q4_K/Q5_K 6-bit scale and min of sub-block j (a tensor of 0..7) from the 12 packed bytes."""
    i = j % 4
    first = _u8(scales + i, mask)  # scale j (j < 4); top bits of scale j (j >= 4)
    second = _u8(scales + 4 + i, mask)  # min j (j < 4); top bits of min j (j >= 4)
    extra = _u8(scales + 8 + i, mask)  # low 4 bits of scale and min j (j >= 4)
    low = j < 4
    sc = tl.where(low, first & 63, (extra & 15) | ((first >> 6) << 4))
    m = tl.where(low, second & 63, (extra >> 4) | ((second >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def _small_blocks(row, step, rmask, n_blocks, FMT: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Q8_0/Q4_0/Q5_0: 8 blocks of 32 per step; tiles [rows, 8 blocks, 16]."""
    blk = step * 8 + tl.arange(0, 8)[None, :, None]
    c = tl.arange(0, 16)[None, None, :]
    mask = rmask & (blk < n_blocks)  # [rows, 8, 1]; K's tail need not fill a step
    block = row + blk * BLOCK_BYTES
    d = _f16(block, mask)
    if FMT == _Q8_0:  # int8 q[32]; lo = the first 16, hi = the last 16
        lo = _to_float(_u8(block + 2 + c, mask) ^ 0x80, 128.0) * d
        hi = _to_float(_u8(block + 18 + c, mask) ^ 0x80, 128.0) * d
    elif FMT == _Q4_0:  # byte c: element c (low nibble), c + 16 (high)
        q = _u8(block + 2 + c, mask)
        lo = _to_float(q & 15, 8.0) * d
        hi = _to_float(q >> 4, 8.0) * d
    else:  # Q5_0: 32 fifth bits (bit j -> element j), then nibbles as Q4_0
        bits_lo = _u8(block + 2, mask) | (_u8(block + 3, mask) << 8)
        bits_hi = _u8(block + 4, mask) | (_u8(block + 5, mask) << 8)
        q = _u8(block + 6 + c, mask)
        lo = _to_float((q & 15) | (((bits_lo >> c) & 1) << 4), 16.0) * d
        hi = _to_float((q >> 4) | (((bits_hi >> c) & 1) << 4), 16.0) * d
    return lo, hi


@triton.jit
def _q45_k(row, step, rmask, FMT: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Q4_K/Q5_K: one super-block; tiles [rows, 4 chunks, 32]: chunk c's bytes hold sub-block 2c
    (low nibbles) and 2c + 1 (high). x = (d * sc) * q - (dmin * m)."""
    sb = row + step * BLOCK_BYTES
    c = tl.arange(0, 4)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    d = _f16(sb, rmask)
    dmin = _f16(sb + 2, rmask)
    sc_lo, m_lo = _k_scale_min(sb + 4, 2 * c, rmask)
    sc_hi, m_hi = _k_scale_min(sb + 4, 2 * c + 1, rmask)
    if FMT == _Q4_K:
        q = _u8(sb + 16 + 32 * c + j, rmask)
        q_lo = q & 15
        q_hi = q >> 4
    else:  # Q5_K: bit j of high byte i is the fifth bit of element i of sub-block j
        q = _u8(sb + 48 + 32 * c + j, rmask)
        high = _u8(sb + 16 + j, rmask)
        q_lo = (q & 15) | (((high >> (2 * c)) & 1) << 4)
        q_hi = (q >> 4) | (((high >> (2 * c + 1)) & 1) << 4)
    lo = (d * sc_lo) * _to_float(q_lo, 0.0) - dmin * m_lo
    hi = (d * sc_hi) * _to_float(q_hi, 0.0) - dmin * m_hi
    return lo, hi


@triton.jit
def _q6_k(row, step, rmask):
    """Q6_K: one super-block; tiles [rows, 8, 16]: low-nibble byte 16g + c holds element
    128h + 16a + c (lo) and that + 64 (hi), h = g // 4, a = g % 4. x = (d * sc) * (q - 32)."""
    sb = row + step * 210
    g = tl.arange(0, 8)[None, :, None]
    c = tl.arange(0, 16)[None, None, :]
    h = g // 4
    a = g % 4
    ql = _u8(sb + 16 * g + c, rmask)
    qh = _u8(sb + 128 + 32 * h + 16 * (a % 2) + c, rmask)  # bits 4-5 of elements i, 32+i, 64+i, 96+i
    shift = 2 * (a // 2)
    q_lo = (ql & 15) | (((qh >> shift) & 3) << 4)
    q_hi = (ql >> 4) | (((qh >> (shift + 4)) & 3) << 4)
    sub = sb + 192 + 8 * h + a  # int8 scale per 16 weights: lo in sub-block 8h + a, hi 4 later
    sc_lo = _to_float(_u8(sub, rmask) ^ 0x80, 128.0)
    sc_hi = _to_float(_u8(sub + 4, rmask) ^ 0x80, 128.0)
    d = _f16(sb + 208, rmask)
    return (d * sc_lo) * _to_float(q_lo, 32.0), (d * sc_hi) * _to_float(q_hi, 32.0)


@triton.jit
def decode_step(row, step, rmask, n_blocks, FMT: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Weights [rows, A, B] of step `step` of each row: (lo, hi), fp32. row: [rows, 1, 1] pointers."""
    if FMT == _Q4_K or FMT == _Q5_K:
        lo, hi = _q45_k(row, step, rmask, FMT, BLOCK_BYTES)
    elif FMT == _Q6_K:
        lo, hi = _q6_k(row, step, rmask)
    else:
        lo, hi = _small_blocks(row, step, rmask, n_blocks, FMT, BLOCK_BYTES)
    return lo, hi


@triton.jit
def lo_index(a, b, FMT: tl.constexpr):
    """Element offset, within a step, of the `lo` weight at tile position (a, b)."""
    if FMT == _Q6_K:
        k = 128 * (a // 4) + 16 * (a % 4) + b
    elif FMT == _Q4_K or FMT == _Q5_K:
        k = 64 * a + b
    else:
        k = 32 * a + b
    return k


@triton.jit
def row_pointers(w_ptr, rows, stride_wn, ALIGN: tl.constexpr):
    """[rows, 1, 1] pointers to each row's first block. ALIGN: a power of two that the host checked
    divides the address and the row stride; it lets Triton widen loads of aligned fields (Q6_K
    rows, 210 bytes a block, are often not 16-byte aligned, but always 2-byte)."""
    ptr = w_ptr + rows.to(tl.int64)[:, None, None] * stride_wn
    return tl.multiple_of(ptr, [ALIGN, ALIGN, ALIGN])
