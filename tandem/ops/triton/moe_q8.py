"""Hot routed experts on the GPU from split rows with int8 activations: the decode kernels that
layers/hot_experts.py runs for GGUF Q4_K / Q6_K / Q8_0 / Q5_0 / Q4_0 / Q5_K experts (a Q4_K_M
file's routed formats, with Q5_0 and Q8_0 where rows are not multiples of 256, e.g. DeepSeek-V2-
Lite's down; Q5_K_M's and Q4_0 files').

moe_quant.py decodes the file's blocks as stored, in fp32: each 256-weight step costs a byte load
per scale and a dozen fp32 ops per weight, so its kernels run at ~0.8 TB/s on an H100. Here the
hot experts' rows are first split once, on the GPU, when they are placed (ops/split_rows.py: the
same bytes, regrouped, so VRAM and HBM reads stay the file's; the row layouts are there): every
block's quants first, then every block's scales, so a step's quants are one aligned run of words.
The activations are quantized to int8 per 32 (as the CPU engine quantizes them for these formats,
csrc/kernels/act.h), so four weights cost one integer dot product (dp4a) and the scales apply once
per 32.

Semantics: with x~ = x quantized per 32 consecutive values (d = max|x| / 127, q = round-half-even
of x * (1 / d), x~ = d * q; 0 where d = 0),
    g = W_gate[e] . x~   u = W_up[e] . x~   h = silu(g) * u   y = W_down[e] . h~
    out[t] = round_x(sum_j y_j * weights[t, j])   (slots j with ids 0..N-1, ascending id: moe.combine)
in fp32 on the dequantized weights (integer sums exact). Against fp32 activations the result
differs by the int8 rounding of x and h: ~1% of the largest output (tests bound it).

Kernels: gate/up, grid (T * k, I / BLOCK_I, parts): BLOCK_I rows (a multiple of 32) of one
slot, a part of the walk over H (_WALK_PARTS parts: more programs in flight, each a shorter walk);
each 256-weight step quantizes its x values (8 groups of 32) in registers, then decodes the gate
and up tiles; the part's sums go to scratch [parts, slots, 2, I]. The last part of a (slot, rows)
to arrive (an arrival counter: stores, a CTA barrier, one acq_rel atomic; it resets the counter)
adds the parts in order and quantizes h per 32 as it stores it (words, d, d * sum(q)). down,
grid (T * k, cdiv(H, BLOCK_D), parts): the same step over I on h's words into [parts, slots, H];
the last program of a token's rows to arrive (over its k slots and their parts, skipped slots
included) does moe.combine's sum for those rows. Sums in a fixed order: deterministic.
A step's 8 groups are taken as 4 "lo" groups (0, 2, 4, 6) and 4 "hi" groups (1, 3, 5, 7): Q4_K
keeps group 2c in the low nibbles and 2c + 1 in the high nibbles of the same 32 bytes, and Q8_0
reads the same way. The arrival counters are shared by a device's calls: launches on one device
must not overlap (hot experts run on one side stream a device).
In Triton's interpreter (tests) the dot products are emulated with integer ops: the same sums
(a tiny model's 76 decode steps gave the same logits there as on an H200, to 1e-7).
Tiles: BLOCK_I = 32, BLOCK_D = 32, 2 warps, 4 parts (a sweep on an H100: V2-Lite, one token,
six Q4_K/Q8_0 experts, 26 layers a CUDA-graph replay: 30.9 us a layer, 1.23 TB/s, against 42.1
unsplit with three more launches at 32/16 rows and 4 warps, and 31.3 with the parts added by
launches of their own instead of the last program to arrive; software pipelining of the walks
(tl.range num_stages 2-3) slowed them; moe_quant.py's blocks as stored: 49.4). Still far from
HBM's rate (benchmarks/hot_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.ops.triton.arrive import arrive, counters
from tandem.ops.triton.fused import _INTERPRETED, _check_device, _on, _round
from tandem.ops.split_rows import LAYOUTS, SPLIT_FORMATS, split_bytes
from tandem.ops.triton.moe import check_slots, check_tokens

__all__ = ["moe_decode_split"]

_CODES = {fmt: i for i, fmt in enumerate(SPLIT_FORMATS)}  # the kernels' constexpr switch
_Q4_K, _Q8_0, _Q6_K, _Q5_0, _Q4_0, _Q5_K = (tl.constexpr(_CODES[fmt]) for fmt in SPLIT_FORMATS)
_HIGH_BITS = tl.constexpr(-0x7F7F7F80)  # 0x80808080 as an int32
_BLOCK_I = 32  # gate/up rows a program: one quantization group of h
_BLOCK_D = 32  # down rows a program
_NUM_WARPS = 2
_WALK_PARTS = 4  # each program's walk over K in up to this many parts


# ---------------------------------------------------------------- kernels


@triton.jit
def _dot4(a, b, SIGNED: tl.constexpr, EMULATE: tl.constexpr):
    """Per int32 element: the sum of its 4 bytes' products, a's bytes signed or not, b's signed."""
    if EMULATE:
        acc = a * 0
        for i in tl.static_range(4):
            if SIGNED:
                ai = (a << (24 - 8 * i)) >> 24
            else:
                ai = (a >> (8 * i)) & 255
            acc += ai * ((b << (24 - 8 * i)) >> 24)
        return acc
    elif SIGNED:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, a * 0],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, a * 0],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _quantize(v):
    """v [G, 8, 4] fp32 (G groups of 32) -> (int8 words [G, 8], d [G], d * sum(q) [G])."""
    d = tl.max(tl.max(tl.abs(v), axis=2), axis=1) / 127.0
    inv = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
    q = ((v * inv[:, None, None] + 12582912.0) - 12582912.0).to(tl.int32)  # round half to even
    words = tl.sum((q & 255) << (8 * tl.arange(0, 4)[None, None, :]), axis=2)
    return words, d, d * tl.sum(tl.sum(q, axis=2), axis=1).to(tl.float32)


@triton.jit
def _fp16(bits):
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q4k_header(hp, rmask, c):
    """A Q4_K header (4 words at hp [BLOCK_N]): d, dmin [BLOCK_N, 1] and the scales and mins of
    groups 2c (lo) and 2c + 1 (hi), [BLOCK_N, 4] each, fp32."""
    w0 = tl.load(hp, mask=rmask, other=0)[:, None]
    s0 = tl.load(hp + 1, mask=rmask, other=0)[:, None]
    s1 = tl.load(hp + 2, mask=rmask, other=0)[:, None]
    s2 = tl.load(hp + 3, mask=rmask, other=0)[:, None]
    d = _fp16(w0 & 0xFFFF)
    dmin = _fp16((w0 >> 16) & 0xFFFF)
    j = 2 * c[None, :]  # lo; hi is j + 1
    shift = 8 * (j % 4)
    b0l, b1l, b2l = (s0 >> shift) & 255, (s1 >> shift) & 255, (s2 >> shift) & 255
    b0h, b1h, b2h = (s0 >> (shift + 8)) & 255, (s1 >> (shift + 8)) & 255, (s2 >> (shift + 8)) & 255
    low = j < 4
    sc_l = tl.where(low, b0l & 63, (b2l & 15) | ((b0l >> 6) << 4)).to(tl.float32)
    m_l = tl.where(low, b1l & 63, (b2l >> 4) | ((b1l >> 6) << 4)).to(tl.float32)
    sc_h = tl.where(low, b0h & 63, (b2h & 15) | ((b0h >> 6) << 4)).to(tl.float32)
    m_h = tl.where(low, b1h & 63, (b2h >> 4) | ((b1h >> 6) << 4)).to(tl.float32)
    return d, dmin, sc_l, m_l, sc_h, m_h


@triton.jit
def _q6k_group(row, step, K, rmask, c, x, HI: tl.constexpr, EMULATE: tl.constexpr):
    """Q6_K: the integer sums of groups 2c + HI of a step against their x words x [4, 8], scaled by
    their two int8 sub-block scales (one per 16 weights) -> [BLOCK_N, 4] int32.

    Group j = 4h + t of a step (h = j // 4, t = j % 4) holds element l (0..31) in the low (t < 2)
    or high nibble of ql byte 64h + 32(t % 2) + l and in bits 2t of qh byte 32h + l; q - 32 as a
    signed byte is ((q | 0x80) - 32) ^ 0x80, four at a time (no borrow crosses a byte)."""
    s2 = tl.arange(0, 2)[None, :, None]  # which 16 of the group
    v = tl.arange(0, 4)[None, None, :]  # word within the 16
    h = c[:, None, None] // 2
    t = 2 * (c[:, None, None] % 2) + HI
    m = rmask[:, None, None, None]
    ql = tl.load(row[:, None, None, None] + (step * 32 + 16 * h + 8 * (t % 2) + 4 * s2 + v)[None], mask=m, other=0)
    qh = tl.load(row[:, None, None, None] + (K // 8 + step * 16 + 8 * h + 4 * s2 + v)[None], mask=m, other=0)
    q = ((ql >> (4 * (t // 2))[None]) & 0x0F0F0F0F) | (((qh >> (2 * t)[None]) & 0x03030303) << 4)
    q = ((q | _HIGH_BITS) - 0x20202020) ^ _HIGH_BITS
    isum = tl.sum(_dot4(q, tl.reshape(x, [4, 2, 4])[None], True, EMULATE), axis=3)  # [BLOCK_N, 4, 2]
    cc = c[:, None]
    sc_byte = 3 * K // 4 + step * 16 + 8 * (cc // 2) + 2 * (2 * (cc % 2) + HI) + tl.arange(0, 2)[None, :]  # [4, 2]
    sc_word = tl.load(row[:, None, None] + (sc_byte // 4)[None], mask=rmask[:, None, None], other=0)
    sc = (sc_word << (24 - 8 * (sc_byte % 4))[None]) >> 24  # the signed scale byte of each 16
    return tl.sum(isum * sc, axis=2)


@triton.jit
def _q6k_step(row, half, step, K, rmask, xl, xh, dl, dh, EMULATE: tl.constexpr):
    c = tl.arange(0, 4)
    il = _q6k_group(row, step, K, rmask, c, xl, 0, EMULATE).to(tl.float32)
    ih = _q6k_group(row, step, K, rmask, c, xh, 1, EMULATE).to(tl.float32)
    d = tl.load(half + 13 * K // 32 + step, mask=rmask, other=0.0).to(tl.float32)[:, None]
    return d * (dl[None, :] * il + dh[None, :] * ih)


@triton.jit
def _q_0_groups(row, half, g, K, m, x, dx, sx, FIVE: tl.constexpr, EMULATE: tl.constexpr):
    """Q4_0 / Q5_0 (FIVE): blocks g [4] (32 weights each: 16 bytes of nibbles at word 4g; Q5_0's
    fifth bits at word K / 8 + g; d at half K / 4 + g, Q5_0's at 5K / 16 + g) against their x words
    x [4, 8], d [4], d * sum(q) [4] -> [BLOCK_N, 4] fp32. Nibble word i holds weights 4i.. (low) and
    16 + 4i.. (high); Q5_0's fifth bits of those are qh bits 4i.. and 16 + 4i.., moved to bit 4 of
    each byte; the codes' offset (8 or 16) comes out of the sum as offset * sum(x)."""
    s2 = tl.arange(0, 2)[None, None, :, None]  # low / high nibbles: weights 0-15 / 16-31
    i = tl.arange(0, 4)[None, None, None, :]
    qs = tl.load(row[:, None, None, None] + (4 * g)[None, :, None, None] + i, mask=m[:, :, None, None], other=0)
    q = (qs >> (4 * s2)) & 0x0F0F0F0F
    if FIVE:
        qh = tl.load(row[:, None] + (K // 8 + g)[None, :], mask=m, other=0)[:, :, None, None]
        b = (qh >> (16 * s2 + 4 * i)) & 0xF
        q = q | ((b & 1) << 4) | ((b & 2) << 11) | ((b & 4) << 18) | ((b & 8) << 25)
    isum = tl.sum(tl.sum(_dot4(q, tl.reshape(x, [4, 2, 4])[None], False, EMULATE), axis=3), axis=2).to(tl.float32)
    d = tl.load(half[:, None] + (5 * K // 16 if FIVE else K // 4) + g[None, :], mask=m, other=0.0).to(tl.float32)
    return d * (dx[None, :] * isum - (16.0 if FIVE else 8.0) * sx[None, :])


@triton.jit
def _step(row, half, step, K, rmask, xl, xh, dl, dh, sl, sh, FMT: tl.constexpr, EMULATE: tl.constexpr):
    """Step `step` (256 weights) of BLOCK_N split rows (row: int32 pointers [BLOCK_N], half: the
    same rows as fp16 pointers) dotted with the step's activations: lo / hi words [4, 8], their
    d [4] and d * sum(q) [4] -> [BLOCK_N, 4] fp32 (a column per lo/hi group pair)."""
    c = tl.arange(0, 4)
    w = tl.arange(0, 8)
    if FMT == _Q4_K or FMT == _Q5_K:
        qw = tl.load(row[:, None, None] + (step * 32 + 8 * c[:, None] + w[None, :])[None], mask=rmask[:, None, None],
                     other=0)
        if FMT == _Q5_K:  # bit j of qh byte l is the fifth bit of group j's weight l
            qh = tl.load(row[:, None, None] + (K // 8 + step * 8 + w)[None, None, :], mask=rmask[:, None, None],
                         other=0)
            lo = (qw & 0x0F0F0F0F) | (((qh >> (2 * c)[None, :, None]) & 0x01010101) << 4)
            hi = ((qw >> 4) & 0x0F0F0F0F) | (((qh >> (2 * c + 1)[None, :, None]) & 0x01010101) << 4)
            il = tl.sum(_dot4(lo, xl[None], False, EMULATE), axis=2).to(tl.float32)
            ih = tl.sum(_dot4(hi, xh[None], False, EMULATE), axis=2).to(tl.float32)
        else:  # Q4_K: written as the kernel was tuned (the same PTX)
            il = tl.sum(_dot4(qw & 0x0F0F0F0F, xl[None], False, EMULATE), axis=2).to(tl.float32)
            ih = tl.sum(_dot4((qw >> 4) & 0x0F0F0F0F, xh[None], False, EMULATE), axis=2).to(tl.float32)
        header = row + (5 * K // 32 if FMT == _Q5_K else K // 8) + 4 * step
        d, dmin, sc_l, m_l, sc_h, m_h = _q4k_header(header, rmask, c)
        return d * (sc_l * (dl[None, :] * il) + sc_h * (dh[None, :] * ih)) - dmin * (
            m_l * sl[None, :] + m_h * sh[None, :])
    elif FMT == _Q6_K:
        return _q6k_step(row, half, step, K, rmask, xl, xh, dl, dh, EMULATE)
    elif FMT == _Q5_0 or FMT == _Q4_0:  # groups are blocks: lo 2c, hi 2c + 1
        g_lo = step * 8 + 2 * c
        m_lo = rmask[:, None] & (g_lo < K // 32)[None, :]
        m_hi = rmask[:, None] & (g_lo + 1 < K // 32)[None, :]
        return (_q_0_groups(row, half, g_lo, K, m_lo, xl, dl, sl, FMT == _Q5_0, EMULATE)
                + _q_0_groups(row, half, g_lo + 1, K, m_hi, xh, dh, sh, FMT == _Q5_0, EMULATE))
    else:  # Q8_0: group g's 8 words at 8g, its d at K / 2 + g (halves)
        g_lo = step * 8 + 2 * c
        m_lo = rmask[:, None] & (g_lo < K // 32)[None, :]
        m_hi = rmask[:, None] & (g_lo + 1 < K // 32)[None, :]
        ql = tl.load(row[:, None, None] + (8 * g_lo[:, None] + w[None, :])[None], mask=m_lo[:, :, None], other=0)
        qh = tl.load(row[:, None, None] + (8 * g_lo[:, None] + 8 + w[None, :])[None], mask=m_hi[:, :, None], other=0)
        il = tl.sum(_dot4(ql, xl[None], True, EMULATE), axis=2).to(tl.float32)
        ih = tl.sum(_dot4(qh, xh[None], True, EMULATE), axis=2).to(tl.float32)
        d_lo = tl.load(half[:, None] + K // 2 + g_lo[None, :], mask=m_lo, other=0.0).to(tl.float32)
        d_hi = tl.load(half[:, None] + K // 2 + 1 + g_lo[None, :], mask=m_hi, other=0.0).to(tl.float32)
        return d_lo * (dl[None, :] * il) + d_hi * (dh[None, :] * ih)


@triton.jit
def _slot_rows(ids_ptr, N, n_rows, BLOCK: tl.constexpr):
    """This program's slot, its id e, whether e is one of the N, its BLOCK rows, a mask for those
    past n_rows and their indices among all experts' rows (e * n_rows + row, int64)."""
    slot = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return slot, e, (e >= 0) & (e < N), rows, rows < n_rows, e * n_rows + rows.to(tl.int64)


@triton.jit
def _gate_up_kernel(
    x_ptr, x_st, ids_ptr, gw, gh, uw, uh, hq_ptr, hd_ptr, hs_ptr, part_ptr, cnt_ptr, tally_ptr, N, I, H, n_steps,
    per_part, n_slots, TALLY: tl.constexpr, G_RW: tl.constexpr, U_RW: tl.constexpr, K: tl.constexpr,
    BLOCK_I: tl.constexpr, G_FMT: tl.constexpr, U_FMT: tl.constexpr, PARTS: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    slot, e, hot, rows, rmask, r = _slot_rows(ids_ptr, N, I, BLOCK_I)
    if TALLY:  # count the slot's id (N for one outside 0..N-1), as moe.hot_split would have
        if (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
            tl.atomic_add(tally_ptr + tl.where(hot, e, N), 1)
    if hot:
        g_row, g_half = gw + r * G_RW, gh + r * (2 * G_RW)
        u_row, u_half = uw + r * U_RW, uh + r * (2 * U_RW)
        c = tl.arange(0, 4)[:, None, None]
        kx = 64 * c + 4 * tl.arange(0, 8)[None, :, None] + tl.arange(0, 4)[None, None, :]  # lo groups' x
        x_row = x_ptr + (slot // K) * x_st
        acc_g = tl.zeros([BLOCK_I, 4], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_I, 4], dtype=tl.float32)
        first = tl.program_id(2) * per_part
        for step in range(first, tl.minimum(first + per_part, n_steps)):
            k = step * 256 + kx
            xl, dl, sl = _quantize(tl.load(x_row + k, mask=k < H, other=0.0).to(tl.float32))
            xh, dh, sh = _quantize(tl.load(x_row + k + 32, mask=k + 32 < H, other=0.0).to(tl.float32))
            acc_g += _step(g_row, g_half, step, H, rmask, xl, xh, dl, dh, sl, sh, G_FMT, EMULATE)
            acc_u += _step(u_row, u_half, step, H, rmask, xl, xh, dl, dh, sl, sh, U_FMT, EMULATE)
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
        if PARTS > 1:  # partial sums [parts, slots, 2, I]; the last part of these rows to arrive adds them
            part = part_ptr + ((tl.program_id(2) * n_slots + slot) * 2) * I
            tl.store(part + rows, g, mask=rmask)
            tl.store(part + I + rows, u, mask=rmask)
            if arrive(cnt_ptr + slot * tl.num_programs(1) + tl.program_id(1), PARTS):
                _act(part_ptr, slot, tl.program_id(1), I, n_slots, PARTS, hq_ptr, hd_ptr, hs_ptr, BLOCK_I)
        else:
            _store_h(g / (1.0 + tl.exp(-g)) * u, slot, tl.program_id(1), I, hq_ptr, hd_ptr, hs_ptr, BLOCK_I)


@triton.jit
def _store_h(h, slot, block, I, hq_ptr, hd_ptr, hs_ptr, BLOCK_I: tl.constexpr):
    """h [BLOCK_I] (rows block * BLOCK_I ...) quantized per 32 into the slot's words, d and d * sum(q)."""
    words, d, s = _quantize(tl.reshape(h, [BLOCK_I // 32, 8, 4]))
    grp = block * (BLOCK_I // 32) + tl.arange(0, BLOCK_I // 32)
    gmask = grp < I // 32
    tl.store(hq_ptr + slot * (I // 4) + 8 * grp[:, None] + tl.arange(0, 8)[None, :], words, mask=gmask[:, None])
    tl.store(hd_ptr + slot * (I // 32) + grp, d, mask=gmask)
    tl.store(hs_ptr + slot * (I // 32) + grp, s, mask=gmask)


@triton.jit
def _act(part_ptr, slot, block, I, n_slots, parts, hq_ptr, hd_ptr, hs_ptr, BLOCK_I: tl.constexpr):
    """h = silu(sum of the gate parts) * (sum of the up parts) of rows block * BLOCK_I..., parts
    added in order (loads from L2: other programs wrote them), quantized into the slot's h."""
    rows = block * BLOCK_I + tl.arange(0, BLOCK_I)
    rmask = rows < I
    g = tl.zeros([BLOCK_I], dtype=tl.float32)
    u = tl.zeros([BLOCK_I], dtype=tl.float32)
    for p in range(0, parts):
        part = part_ptr + ((p * n_slots + slot) * 2) * I
        g += tl.load(part + rows, mask=rmask, other=0.0, cache_modifier=".cg")
        u += tl.load(part + I + rows, mask=rmask, other=0.0, cache_modifier=".cg")
    _store_h(g / (1.0 + tl.exp(-g)) * u, slot, block, I, hq_ptr, hd_ptr, hs_ptr, BLOCK_I)


@triton.jit
def _down_kernel(
    hq_ptr, hd_ptr, hs_ptr, ids_ptr, w_ptr, dw, dh_ptr, y_ptr, out_ptr, cnt_ptr, N, I, H, n_steps, per_part,
    n_slots, parts, RW: tl.constexpr, BLOCK_D: tl.constexpr, FMT: tl.constexpr, K: tl.constexpr,
    BLOCK_K: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    slot, _e, hot, rows, rmask, r = _slot_rows(ids_ptr, N, H, BLOCK_D)
    if hot:
        row, half = dw + r * RW, dh_ptr + r * (2 * RW)
        c = tl.arange(0, 4)
        w = tl.arange(0, 8)
        acc = tl.zeros([BLOCK_D, 4], dtype=tl.float32)
        first = tl.program_id(2) * per_part
        for step in range(first, tl.minimum(first + per_part, n_steps)):
            g_lo = step * 8 + 2 * c
            ml, mh = g_lo < I // 32, g_lo + 1 < I // 32
            base = slot * (I // 4) + 8 * g_lo[:, None] + w[None, :]
            xl = tl.load(hq_ptr + base, mask=ml[:, None], other=0)
            xh = tl.load(hq_ptr + base + 8, mask=mh[:, None], other=0)
            gi = slot * (I // 32) + g_lo
            dl, sl = tl.load(hd_ptr + gi, mask=ml, other=0.0), tl.load(hs_ptr + gi, mask=ml, other=0.0)
            dh, sh = tl.load(hd_ptr + gi + 1, mask=mh, other=0.0), tl.load(hs_ptr + gi + 1, mask=mh, other=0.0)
            acc += _step(row, half, step, I, rmask, xl, xh, dl, dh, sl, sh, FMT, EMULATE)
        tl.store(y_ptr + (tl.program_id(2) * n_slots + slot) * H + rows, tl.sum(acc, axis=1), mask=rmask)
    # Every program counts in (hot or not); the token's last one combines its rows.
    t = slot // K
    if arrive(cnt_ptr + t * tl.num_programs(1) + tl.program_id(1), K * parts):
        _combine_rows(y_ptr, ids_ptr, w_ptr, out_ptr, t, rows, rmask, N, H, n_slots, parts, K, BLOCK_K, EMULATE)


@triton.jit
def _combine_rows(y_ptr, ids_ptr, w_ptr, out_ptr, t, rows, rmask, N, H, n_slots, parts, K: tl.constexpr,
                  BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """moe.combine for some rows of token t, each slot's y the sum of its parts [parts, slots, H]
    (in order; loads from L2: other programs wrote them): slots in ascending id order."""
    j = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + t * K + j, mask=j < K, other=-1).to(tl.int64)
    beyond = N * BLOCK_K  # past every valid key
    key = tl.where((ids >= 0) & (ids < N), ids * BLOCK_K + j, beyond)
    out = tl.zeros(rows.shape, tl.float32)
    for _ in range(K):
        first = tl.min(key, axis=0)
        if first < beyond:
            s = first % BLOCK_K
            y = tl.zeros(rows.shape, tl.float32)
            for p in range(0, parts):
                y += tl.load(y_ptr + (p * n_slots + t * K + s) * H + rows, mask=rmask, other=0.0, cache_modifier=".cg")
            out += y * tl.load(w_ptr + t * K + s).to(tl.float32)
        key = tl.where(key == first, beyond, key)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + t * H + rows, _round(out, out_dtype, EMULATE).to(out_dtype), mask=rmask)


# ---------------------------------------------------------------- host


def _check_split(name: str, data: torch.Tensor, fmt: str, n_exp: int, rows: int, k: int) -> None:
    if fmt not in LAYOUTS:
        raise ValueError(f"{name}: split rows take {', '.join(SPLIT_FORMATS)}, got {fmt!r}")
    want = split_bytes(fmt, k)
    if (data.dtype != torch.uint8 or data.dim() != 3 or tuple(data.shape) != (n_exp, rows, want) or k % LAYOUTS[fmt][0]
            or not data.is_contiguous()):
        raise ValueError(f"{name} must be contiguous {fmt} split rows uint8 [N={n_exp}, {rows}, {want}] (rows of {k} "
                         f"weights), got {data.dtype} {tuple(data.shape)}")


def moe_decode_split(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gate_type: str,
    up_type: str,
    down_type: str,
    tally: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hot experts on split rows (see the module docstring): x [T, H] float, ids int32 [T, k] (k <=
    16; ids outside 0..N-1 skipped), weights [T, k], gate/up uint8 [N, I, row_bytes(H)], down
    uint8 [N, H, row_bytes(I)] as split_rows left them -> out [T, H] in x's dtype. `tally` (int64
    [N + 1], optional): each slot's id counted in place, N for one outside 0..N-1 (what
    moe.hot_split counts, for a layer whose experts are all hot: ids are then the hot indices and
    no split runs). Raises ValueError for what it does not take."""
    n_tok, hidden = check_tokens(x, weights)
    if gate.dim() != 3:
        raise ValueError(f"gate must be split rows [N, I, row_bytes], got {tuple(gate.shape)}")
    n_exp, inter = gate.shape[:2]
    _check_split("gate", gate, gate_type, n_exp, inter, hidden)
    _check_split("up", up, up_type, n_exp, inter, hidden)
    _check_split("down", down, down_type, n_exp, hidden, inter)
    if inter % 32:
        raise ValueError(f"the experts' intermediate size must be a multiple of 32, got {inter}")
    top_k = check_slots(ids, weights, n_tok)
    _check_device(x, ids, weights, gate, up, down, *([] if tally is None else [tally]))
    if tally is not None and (tally.dtype != torch.int64 or tuple(tally.shape) != (n_exp + 1,)):
        raise ValueError(f"tally must be int64 [N + 1 = {n_exp + 1}], got {tally.dtype} {tuple(tally.shape)}")
    out = torch.empty(n_tok, hidden, dtype=x.dtype, device=x.device)
    if n_tok == 0 or n_exp == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()
    ids, weights = ids.contiguous(), weights.contiguous()
    slots = n_tok * top_k
    hq = torch.empty(slots, inter // 4, dtype=torch.int32, device=x.device)
    hd = torch.empty(slots, inter // 32, dtype=torch.float32, device=x.device)
    hs = torch.empty_like(hd)
    words = [t.view(torch.int32) for t in (gate, up, down)]
    halves = [t.view(torch.float16) for t in (gate, up, down)]
    gu_steps, d_steps = triton.cdiv(hidden, 256), triton.cdiv(inter, 256)
    gu_per, d_per = triton.cdiv(gu_steps, _WALK_PARTS), triton.cdiv(d_steps, _WALK_PARTS)
    gu_parts, d_parts = triton.cdiv(gu_steps, gu_per), triton.cdiv(d_steps, d_per)  # no empty parts
    y_part = torch.empty(d_parts, slots, hidden, dtype=torch.float32, device=x.device)
    g_part = torch.empty(gu_parts, slots, 2, inter, dtype=torch.float32, device=x.device) if gu_parts > 1 else y_part
    gu_blocks, d_blocks = triton.cdiv(inter, _BLOCK_I), triton.cdiv(hidden, _BLOCK_D)
    # Arrival counters: [slots, gu_blocks] for gate/up, then [T, d_blocks] for down.
    cnt = counters("moe_q8", x.device, slots * gu_blocks + n_tok * d_blocks)
    with _on(x):
        _gate_up_kernel[(slots, gu_blocks, gu_parts)](
            x, x.stride(0), ids, words[0], halves[0], words[1], halves[1], hq, hd, hs, g_part, cnt,
            ids if tally is None else tally, n_exp, inter, hidden, gu_steps, gu_per, slots, TALLY=tally is not None,
            G_RW=gate.shape[2] // 4, U_RW=up.shape[2] // 4, K=top_k,
            BLOCK_I=_BLOCK_I, G_FMT=_CODES[gate_type], U_FMT=_CODES[up_type], PARTS=gu_parts,
            EMULATE=_INTERPRETED, num_warps=_NUM_WARPS,
        )  # fmt: skip
        _down_kernel[(slots, d_blocks, d_parts)](
            hq, hd, hs, ids, weights, words[2], halves[2], y_part, out, cnt[slots * gu_blocks:], n_exp, inter, hidden,
            d_steps, d_per, slots, d_parts, RW=down.shape[2] // 4, BLOCK_D=_BLOCK_D, FMT=_CODES[down_type], K=top_k,
            BLOCK_K=triton.next_power_of_2(top_k), EMULATE=_INTERPRETED, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return out
