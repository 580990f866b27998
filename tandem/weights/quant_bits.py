"""Helpers shared by the block codecs in `quant.py` and `quant_kquants.py`.

Blocks travel as uint8 arrays [n_blocks, block_bytes]; these helpers read and write the fp16
scale fields inside them, pack small integers into nibbles and bit planes, and pick the scale
of a lopsided signed level range, all vectorized over every block at once.
"""

from __future__ import annotations

import numpy as np

from tandem.errors import TandemError


def read_f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` of each block, as float32 [n, 1]."""
    field = np.ascontiguousarray(blocks[:, offset:offset + 2])
    return field.view(np.float16).astype(np.float32)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """fp16 values [n] (or [n, 1]) as the two little-endian bytes a block stores: uint8 [n, 2]."""
    return np.ascontiguousarray(values, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def to_f16(values: np.ndarray) -> np.ndarray:
    """Round scales to the nearest fp16; a scale too large for fp16 is a user error, not an inf."""
    with np.errstate(over="ignore"):  # reported below as a TandemError
        half = np.asarray(values, dtype=np.float32).astype(np.float16)
    _check_finite(half)
    return half


def to_f16_at_least(values: np.ndarray) -> np.ndarray:
    """Round non-negative scales to the smallest fp16 >= the value.

    K-quant sub-scales are ceil'ed against the super-block scale; rounding that scale up keeps
    every ceil'ed sub-scale within its 6- or 8-bit range.
    """
    values = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):  # reported below as a TandemError
        half = values.astype(np.float16)
    low = half.astype(np.float32) < values
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    _check_finite(half)
    return half


def _check_finite(half: np.ndarray) -> None:
    if not np.isfinite(half).all():
        raise TandemError(
            "weights too large for an fp16 block scale (|x| beyond ~1e6); "
            "store this tensor as F32 or BF16 instead"
        )


def pack_nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Two uint8 arrays of values 0..15 -> one byte each: `low | high << 4`."""
    return (low & 0x0F) | ((high & 0x0F) << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., m] -> uint8 [..., 2, m]: the low nibbles, then the high nibbles."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-2)


def pack_bit_planes(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., p, m] of `bits`-wide values -> uint8 [..., m]; plane j lands at bit j*bits."""
    shifts = (np.arange(values.shape[-2], dtype=np.uint8) * bits)[:, None]
    mask = np.uint8((1 << bits) - 1)
    # The planes occupy disjoint bits, so summing them equals OR-ing them.
    return np.sum((values & mask) << shifts, axis=-2, dtype=np.uint8)


def unpack_bit_planes(packed: np.ndarray, bits: int, planes: int) -> np.ndarray:
    """Inverse of `pack_bit_planes`: uint8 [..., m] -> uint8 [..., planes, m]."""
    shifts = (np.arange(planes, dtype=np.uint8) * bits)[:, None]
    return (packed[..., None, :] >> shifts) & np.uint8((1 << bits) - 1)


def signed_scale(x: np.ndarray, n_neg: int, n_pos: int) -> np.ndarray:
    """Smallest-magnitude scale d whose levels d*[-n_neg .. n_pos] cover every value of each row.

    The level range is lopsided, so both signs of d are tried: with d > 0 the extra level
    covers the negative side, with d < 0 the positive side. x [..., m] -> float32 [...].
    """
    top = np.maximum(x.max(axis=-1), 0)
    bottom = np.maximum(-x.min(axis=-1), 0)
    positive = np.maximum(bottom / n_neg, top / n_pos)
    negative = np.maximum(top / n_neg, bottom / n_pos)
    return np.where(positive <= negative, positive, -negative).astype(np.float32)
