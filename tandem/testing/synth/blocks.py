"""Random but valid weight bytes, written straight into each format's block layout.

Random bytes for every quantized field (nibbles, sub-block scales, high bits) are valid; only
the fp16 super-block scales need care: they are set to one finite value per tensor chosen so
that dequantized weights have a standard deviation near 1/sqrt(K) (K = row length), which keeps
activations O(1) through a layer. Generation uses numpy's PCG64 `random_raw` (which releases
the GIL, so chunks are drawn on several threads) plus a strided patch of the scale fields:
several GB/s on a many-core machine, instead of running any quantizer.

Chunk c of tensor t is drawn from SeedSequence([seed, t, c]): the file is the same whatever the
number of threads.
"""

from __future__ import annotations

import math

import numpy as np

# format -> (elements per block, bytes per block, {u16 column of an fp16 scale: multiple of d},
#            std of one dequantized weight in units of d)
# Q4_K/Q5_K: x = d*sc*q - dmin*m with sc, m, q uniform; dmin = mean(q) * d centres the weights.
_LAYOUT = {
    "Q4_K": (256, 144, {0: 1.0, 1: 7.5}, 240.0),
    "Q5_K": (256, 176, {0: 1.0, 1: 15.5}, 490.0),
    "Q6_K": (256, 210, {104: 1.0}, 1370.0),  # x = d*sc*(q-32), sc int8
    "Q5_0": (32, 22, {0: 1.0}, 9.2),  # x = d*(q-16)
    "Q8_0": (32, 34, {0: 1.0}, 73.9),  # x = d*q, q int8
}
# Formats with int8 fields (Q8_0 weights, Q6_K scales) where -128 must not appear: SIMD sign
# tricks cannot negate it, and llama.cpp's quantizers never write it.
_NO_MINUS_128 = ("Q8_0", "Q6_K")
CHUNK_BYTES = 32 << 20


def _random_bytes(nbytes: int, seed: tuple[int, ...]) -> np.ndarray:
    bits = np.random.PCG64(np.random.SeedSequence(list(seed)))
    return bits.random_raw(-(-nbytes // 8)).view(np.uint8)[:nbytes]


def _f16_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float16).view(np.uint16))


def quant_chunk(fmt: str, k: int, n_rows: int, seed: tuple[int, ...]) -> np.ndarray:
    """n_rows rows of k weights in `fmt` (uint8 [n_rows * row_bytes])."""
    elems, size, scales, std = _LAYOUT[fmt]
    n_blocks = n_rows * (k // elems)
    raw = _random_bytes(n_blocks * size, seed)
    if fmt in _NO_MINUS_128:
        # One contiguous pass over every byte (fast) rather than the int8 fields only (strided):
        # other fields stay random, and the scales are written over afterwards.
        np.bitwise_or(raw, raw == 0x80, out=raw)  # 0x80 (-128) -> 0x81 (-127)
    words = raw.reshape(n_blocks, size).view(np.uint16)  # [n_blocks, size / 2]
    d = 1.0 / (std * math.sqrt(k))
    for col, mult in scales.items():
        words[:, col] = _f16_bits(d * mult)
    return raw


def float_chunk(fmt: str, k: int, n_rows: int, seed: tuple[int, ...]) -> np.ndarray:
    """BF16 / F16 rows: random sign and mantissa, one exponent near 1/sqrt(k)."""
    raw = _random_bytes(n_rows * k * 2, seed)
    words = raw.view(np.uint16)
    e = math.floor(math.log2(1.0 / math.sqrt(k)))
    if fmt == "BF16":  # s eeeeeeee mmmmmmm
        words &= 0x807F
        words |= (127 + e) << 7
    else:  # F16: s eeeee mmmmmmmmmm
        words &= 0x83FF
        words |= (15 + e) << 10
    return raw


def chunk_rows(row_bytes: int) -> int:
    """Rows per chunk: about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // row_bytes)


def weight_chunk(fmt: str, k: int, n_rows: int, seed: tuple[int, ...]) -> np.ndarray:
    if fmt in ("BF16", "F16"):
        return float_chunk(fmt, k, n_rows, seed)
    return quant_chunk(fmt, k, n_rows, seed)


def small_f32(role: str, shape: tuple[int, ...], seed: tuple[int, ...], skew: float = 0.0) -> np.ndarray:
    """Norms (ones), biases (zeros), routers: N(0, 1/H) rows, with a Zipf-like skew.

    Router skew S: the expert of hotness rank r (a seeded permutation) has its row scaled by
    1 + S / (1 + r). A row with a larger norm gives logits of larger spread, so that expert lands
    in the top-k far more often, whatever the input (S = 8 makes the hottest ~10x the uniform rate).
    """
    if role == "norm":
        return np.ones(shape, np.float32)
    if role == "bias":
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng(list(seed))
    w = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[-1]))
    if skew and role == "router":
        rank = np.empty(shape[0], np.int64)
        rank[rng.permutation(shape[0])] = np.arange(shape[0])
        w *= (1.0 + skew / (1.0 + rank)).astype(np.float32)[:, None]
    return w
