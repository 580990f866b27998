"""K-quant block codecs (Q4_K, Q5_K, Q6_K): 256-element super-blocks with quantized sub-block scales.

Layouts (ggml's block_q4_K / block_q5_K / block_q6_K, little-endian):

    Q4_K  fp16 d | fp16 dmin | 12 B scales+mins | 128 B nibbles           8 x 32 elements
    Q5_K  fp16 d | fp16 dmin | 12 B scales+mins | 32 B high bits | 128 B   8 x 32 elements
    Q6_K  128 B low nibbles | 64 B high 2-bit pairs | int8 scales[16] | fp16 d   16 x 16 elements

Q4_K/Q5_K sub-block j:  x = (d * sc[j]) * q - (dmin * m[j]),  sc, m 6-bit, q in 0..15 / 0..31.
Q6_K sub-block j:       x = (d * sc[j]) * (q - 32),           sc int8, q in 0..63.

Quantizers (one pass, no scale search): each sub-block's range is covered exactly by rounding
the super-block scales and every sub-scale/min *up*, so no value is ever clipped and the error
is at most half a step; then round-to-nearest. Functions map uint8 [n, bytes] <-> float32 [n, 256].
"""

from __future__ import annotations

import numpy as np

from tandem.weights.quant_bits import (
    f16_bytes,
    pack_bit_planes,
    pack_nibbles,
    read_f16,
    signed_scale,
    to_f16_at_least,
    unpack_bit_planes,
    unpack_nibbles,
)

Q4_K_BYTES = 2 + 2 + 12 + 128
Q5_K_BYTES = 2 + 2 + 12 + 32 + 128
Q6_K_BYTES = 128 + 64 + 16 + 2


# ---------------------------------------------------------------- 6-bit scales and mins (Q4_K, Q5_K)


def _unpack_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes [n, 12] -> scales, mins uint8 [n, 8], 6 bits each.

    Bytes 0-3: scale j (low 6 bits); bytes 4-7: min j. Sub-blocks 4-7 keep their low 4 bits in
    bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in the spare top bits of
    bytes 0-3 (scale) and 4-7 (min).
    """
    first, second, extra = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([first & 0x3F, (extra & 0x0F) | ((first >> 6) << 4)], axis=1)
    mins = np.concatenate([second & 0x3F, (extra >> 4) | ((second >> 6) << 4)], axis=1)
    return scales, mins


def _pack_scales_mins(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Inverse of `_unpack_scales_mins`: uint8 [n, 8] each (values < 64) -> [n, 12]."""
    first = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    second = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    extra = pack_nibbles(scales[:, 4:], mins[:, 4:])
    return np.concatenate([first, second, extra], axis=1)


def _decode_affine(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: (d*sc) * q - (dmin*m), in that float32 order (llama.cpp's), q uint8 [n, 8, 32]."""
    d, dmin = read_f16(blocks, 0), read_f16(blocks, 2)  # [n, 1]
    sc, m = _unpack_scales_mins(blocks[:, 4:16])
    step = (d * sc.astype(np.float32))[:, :, None]  # [n, 8, 1]
    offset = (dmin * m.astype(np.float32))[:, :, None]
    return (step * q.astype(np.float32) - offset).reshape(-1, 256)


def _encode_affine(x: np.ndarray, top: int) -> tuple[np.ndarray, ...]:
    """Fit x [n, 256] as 8 sub-blocks of (d*sc) * q - (dmin*m), q in 0..top.

    Each sub-block spans [min(lo, 0), hi]; its offset dmin*m >= -lo and step d*sc >= (hi+offset)/top
    (both rounded up), so q = round((x + offset) / step) never leaves 0..top.
    Returns d16 [n], dmin16 [n], sc [n, 8], m [n, 8], q [n, 8, 32] (uint8).
    """
    x = x.reshape(-1, 8, 32)
    want_min = np.maximum(-x.min(axis=2), 0)  # [n, 8]; the offset only ever subtracts
    dmin16 = to_f16_at_least(want_min.max(axis=1) / 63)
    dmin = dmin16.astype(np.float32)[:, None]
    m = _ceil_ratio(want_min, dmin, 63)
    offset = dmin * m.astype(np.float32)  # [n, 8], as the decoder computes it

    want_step = (x.max(axis=2) + offset) / top  # >= 0 because offset >= -min(x)
    d16 = to_f16_at_least(want_step.max(axis=1) / 63)
    d = d16.astype(np.float32)[:, None]
    sc = _ceil_ratio(want_step, d, 63)
    step = (d * sc.astype(np.float32))[:, :, None]

    shifted = x + offset[:, :, None]
    q = np.divide(shifted, step, out=np.zeros_like(shifted), where=step > 0)
    q = np.clip(np.rint(q), 0, top).astype(np.uint8)
    return d16, dmin16, sc, m, q


def _ceil_ratio(value: np.ndarray, unit: np.ndarray, highest: int) -> np.ndarray:
    """ceil(value / unit) as uint8 in 0..highest; 0 where unit is 0."""
    ratio = np.divide(value, unit, out=np.zeros_like(value), where=unit > 0)
    # The super-block unit was rounded up, so only float noise can push past `highest`.
    return np.clip(np.ceil(ratio), 0, highest).astype(np.uint8)


# ---------------------------------------------------------------- Q4_K


def decode_q4_k(blocks: np.ndarray) -> np.ndarray:
    # 4 chunks of 32 bytes; chunk c holds sub-block 2c in low nibbles, 2c+1 in high nibbles.
    q = unpack_nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _decode_affine(blocks, q)


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    d16, dmin16, sc, m, q = _encode_affine(x, 15)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = pack_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(-1, 128)
    return np.concatenate([f16_bytes(d16), f16_bytes(dmin16), _pack_scales_mins(sc, m), qs], axis=1)


# ---------------------------------------------------------------- Q5_K


def decode_q5_k(blocks: np.ndarray) -> np.ndarray:
    # Low 4 bits as in Q4_K; bit j of high byte i is the 5th bit of element i of sub-block j.
    low = unpack_nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = unpack_bit_planes(blocks[:, 16:48], bits=1, planes=8)  # [n, 8, 32]
    return _decode_affine(blocks, low | (high << 4))


def encode_q5_k(x: np.ndarray) -> np.ndarray:
    d16, dmin16, sc, m, q = _encode_affine(x, 31)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = pack_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(-1, 128)
    qh = pack_bit_planes(q >> 4, bits=1)  # [n, 32]
    return np.concatenate([f16_bytes(d16), f16_bytes(dmin16), _pack_scales_mins(sc, m), qh, qs], axis=1)


# ---------------------------------------------------------------- Q6_K


def decode_q6_k(blocks: np.ndarray) -> np.ndarray:
    # Two halves of 128 elements. Half h: low-nibble byte h*64+i holds element i (low) and 64+i
    # (high); high byte h*32+i holds bits 4-5 of elements i, 32+i, 64+i, 96+i (bit pairs 0..3).
    low = unpack_nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)
    high = unpack_bit_planes(blocks[:, 128:192].reshape(-1, 2, 32), bits=2, planes=4)  # [n, 2, 4, 32]
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32).reshape(-1, 16, 16)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    d = read_f16(blocks, 208)
    return ((d * sc)[:, :, None] * q).reshape(-1, 256)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, 16, 16)
    want = signed_scale(x, 32, 31)  # [n, 16]: levels want*[-32 .. 31] cover each sub-block

    # Sub-scales are int8 in -127..127 units of d, magnitudes rounded up so coverage holds.
    d16 = to_f16_at_least(np.abs(want).max(axis=1) / 127)
    d = d16.astype(np.float32)[:, None]
    sc = np.sign(want) * _ceil_ratio(np.abs(want), d, 127)
    step = (d * sc.astype(np.float32))[:, :, None]  # [n, 16, 1], as the decoder computes it

    q = np.divide(x, step, out=np.zeros_like(x), where=step != 0)
    q = (np.clip(np.rint(q), -32, 31) + 32).astype(np.uint8)
    halves = q.reshape(-1, 2, 2, 64)  # [n, half, first/second 64, i]
    ql = pack_nibbles(halves[:, :, 0], halves[:, :, 1])
    qh = pack_bit_planes(q.reshape(-1, 2, 4, 32) >> 4, bits=2)  # [n, 2, 32]
    return np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), f16_bytes(d16)], axis=1
    )
