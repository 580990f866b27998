"""The one table of weight formats: block geometry, reference dequantizer and quantizer per format.

A quantized row of K weights is K / block_size blocks of block_bytes bytes each, laid out as in
GGUF (ggml's block structs, little-endian), so GGUF tensor data can be used as is:

    raw uint8 [..., row_bytes]  --dequantize-->  float32 [..., K]
    x float32 [..., K]          --quantize---->  raw uint8 [..., row_bytes]

Every codec is vectorized numpy over all blocks. The dequantizers give the same float32 as
llama.cpp's (`gguf.quants.dequantize`), bit for bit; they are the spec the C++ kernels are
tested against. The quantizers are round-to-nearest with scales chosen in one pass (no
iterative scale search like llama.cpp's), so their bytes differ from llama.cpp's, not their
format. The K-quant codecs live in `quant_kquants.py`; bit packing in `quant_bits.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np

from tandem.errors import TandemError
from tandem.weights import quant_kquants as kq
from tandem.weights.quant_bits import f16_bytes, pack_nibbles, read_f16, signed_scale, to_f16, unpack_nibbles

# Codecs work on this many elements at a time, so temporaries stay small on big tensors.
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class QuantFormat:
    """One weight format. `dequantize`/`quantize` map whole rows (any leading shape)."""

    name: str
    ggml_type: int | None  # GGMLQuantizationType id in GGUF files; None if GGUF has no such type
    block_size: int  # elements per block
    block_bytes: int  # bytes per block
    dequantize: Callable[[np.ndarray], np.ndarray]  # uint8 [..., row_bytes] -> float32 [..., K]
    quantize: Callable[[np.ndarray], np.ndarray]  # float32 [..., K] -> uint8 [..., row_bytes]

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_bytes <= 0:
            raise ValueError(f"{self.name}: block_size and block_bytes must be positive")

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size


# ---------------------------------------------------------------- row <-> block plumbing


def _dequantize_rows(raw: np.ndarray, *, name: str, block_size: int, block_bytes: int, decode) -> np.ndarray:
    raw = np.ascontiguousarray(raw)
    if raw.ndim == 0:
        raise TandemError(f"{name} data must be an array of bytes, got a scalar")
    if raw.dtype != np.uint8:
        # e.g. GGUFReader hands F32/F16 tensors over as float arrays: read their bytes.
        raw = raw.view(np.uint8)
    if raw.shape[-1] % block_bytes:
        raise TandemError(
            f"{name} rows must be a whole number of {block_bytes}-byte blocks, got {raw.shape[-1]} bytes "
            f"per row; the tensor's size or type in the file is wrong"
        )
    n_blocks = raw.size // block_bytes
    blocks = raw.reshape(n_blocks, block_bytes)
    out = np.empty((n_blocks, block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        out[start:start + step] = decode(blocks[start:start + step])
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes * block_size)


def _quantize_rows(x: np.ndarray, *, name: str, block_size: int, block_bytes: int, encode) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise TandemError(f"quantizing to {name} needs an array of rows, got a scalar")
    _check_row_length(name, block_size, x.shape[-1])
    # A NaN or Inf would poison the shared scale of its whole block; float formats keep them.
    if block_size > 1 and not np.isfinite(x).all():
        raise TandemError(f"cannot quantize to {name}: the weights contain NaN or Inf")
    n_blocks = x.size // block_size
    blocks = x.reshape(n_blocks, block_size)
    out = np.empty((n_blocks, block_bytes), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        out[start:start + step] = encode(blocks[start:start + step])
    return out.reshape(*x.shape[:-1], x.shape[-1] // block_size * block_bytes)


def _check_row_length(name: str, block_size: int, k: int) -> None:
    if k % block_size:
        raise TandemError(
            f"{name} stores rows in blocks of {block_size} elements, but this row has {k}; "
            f"pick a format with a block size that divides {k} (e.g. F16, BF16 or Q8_0)"
        )


# ---------------------------------------------------------------- float formats


def _decode_f32(blocks: np.ndarray) -> np.ndarray:  # [n, 4] -> [n, 1]
    return blocks.view(np.float32)


def _encode_f32(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint8)


def _decode_f16(blocks: np.ndarray) -> np.ndarray:  # [n, 2] -> [n, 1]
    return blocks.view(np.float16).astype(np.float32)


def _encode_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond fp16's range becomes +-Inf, as in torch
        return x.astype(np.float16).view(np.uint8)  # round to nearest even, like torch


def _decode_bf16(blocks: np.ndarray) -> np.ndarray:  # [n, 2] -> [n, 1]
    # bf16 is the top half of a float32.
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _encode_bf16(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32)
    # Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    # Rounding could carry a NaN into Inf: keep its sign and top bits, made quiet (as ggml does).
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = np.where(nan, (bits >> 16) | 0x0040, rounded)
    return rounded.astype(np.uint16).view(np.uint8)


# ---------------------------------------------------------------- 32-element blocks: Q8_0, Q4_0, Q5_0


def _decode_q8_0(blocks: np.ndarray) -> np.ndarray:
    # block: fp16 d, int8 q[32]; x = q * d
    d = read_f16(blocks, 0)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return q * d


def _encode_q8_0(x: np.ndarray) -> np.ndarray:
    # Symmetric levels -127..127 (never -128, which SIMD sign tricks cannot negate).
    d16 = to_f16(np.abs(x).max(axis=1) / 127)
    q = _round_with_scale(x, d16.astype(np.float32)[:, None], -127, 127)
    return np.concatenate([f16_bytes(d16), q.astype(np.int8).view(np.uint8)], axis=1)


def _round_with_scale(x: np.ndarray, scale: np.ndarray, lowest: int, highest: int) -> np.ndarray:
    """round(x / scale) clipped to [lowest, highest]; 0 where the scale is 0. Broadcasts."""
    q = np.divide(x, scale, out=np.zeros(np.broadcast_shapes(x.shape, scale.shape), np.float32), where=scale != 0)
    return np.clip(np.rint(q), lowest, highest)


def _decode_q4_0(blocks: np.ndarray) -> np.ndarray:
    # block: fp16 d, 16 bytes; byte i holds element i (low nibble) and i+16 (high); x = (q - 8) * d
    d = read_f16(blocks, 0)
    q = unpack_nibbles(blocks[:, 2:]).reshape(-1, 32)
    return (q.astype(np.int8) - np.int8(8)).astype(np.float32) * d


def _encode_q4_0(x: np.ndarray) -> np.ndarray:
    d16 = to_f16(signed_scale(x, 8, 7))
    # Round with the stored fp16 scale, so the scale's own rounding adds no error.
    q = (_round_with_scale(x, d16.astype(np.float32)[:, None], -8, 7) + 8).astype(np.uint8)
    return np.concatenate([f16_bytes(d16), pack_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _decode_q5_0(blocks: np.ndarray) -> np.ndarray:
    # block: fp16 d, uint32 high bits (bit j -> element j), 16 bytes low nibbles as Q4_0;
    # x = (q - 16) * d
    d = read_f16(blocks, 0)
    high = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")
    low = unpack_nibbles(blocks[:, 6:]).reshape(-1, 32)
    q = low | (high << 4)
    return (q.astype(np.int8) - np.int8(16)).astype(np.float32) * d


def _encode_q5_0(x: np.ndarray) -> np.ndarray:
    d16 = to_f16(signed_scale(x, 16, 15))
    q = (_round_with_scale(x, d16.astype(np.float32)[:, None], -16, 15) + 16).astype(np.uint8)
    high = np.packbits(q >> 4, axis=1, bitorder="little")
    return np.concatenate([f16_bytes(d16), high, pack_nibbles(q[:, :16], q[:, 16:])], axis=1)


# ---------------------------------------------------------------- the table


def _format(name: str, ggml_type: int | None, block_size: int, block_bytes: int, decode, encode) -> QuantFormat:
    geometry = dict(name=name, block_size=block_size, block_bytes=block_bytes)
    return QuantFormat(
        name=name,
        ggml_type=ggml_type,
        block_size=block_size,
        block_bytes=block_bytes,
        dequantize=partial(_dequantize_rows, decode=decode, **geometry),
        quantize=partial(_quantize_rows, encode=encode, **geometry),
    )


FORMATS: Mapping[str, QuantFormat] = MappingProxyType({
    f.name: f
    for f in (
        _format("F32", 0, 1, 4, _decode_f32, _encode_f32),
        _format("F16", 1, 1, 2, _decode_f16, _encode_f16),
        _format("BF16", 30, 1, 2, _decode_bf16, _encode_bf16),
        _format("Q8_0", 8, 32, 2 + 32, _decode_q8_0, _encode_q8_0),
        _format("Q4_0", 2, 32, 2 + 16, _decode_q4_0, _encode_q4_0),
        _format("Q5_0", 6, 32, 2 + 4 + 16, _decode_q5_0, _encode_q5_0),
        _format("Q4_K", 12, 256, kq.Q4_K_BYTES, kq.decode_q4_k, kq.encode_q4_k),
        _format("Q5_K", 13, 256, kq.Q5_K_BYTES, kq.decode_q5_k, kq.encode_q5_k),
        _format("Q6_K", 14, 256, kq.Q6_K_BYTES, kq.decode_q6_k, kq.encode_q6_k),
    )
})


# ---------------------------------------------------------------- helpers


def format_of(key: str | int | QuantFormat) -> QuantFormat:
    """Look a format up by name ("Q4_K", any case) or GGUF ggml type id (12)."""
    if isinstance(key, QuantFormat):
        return key
    if isinstance(key, str):
        found = FORMATS.get(key.upper())
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        found = next((f for f in FORMATS.values() if f.ggml_type == int(key)), None)
    else:
        found = None
    if found is None:
        supported = ", ".join(f"{f.name} ({f.ggml_type})" for f in FORMATS.values())
        raise TandemError(f"unsupported weight format {key!r}; supported formats (ggml type): {supported}")
    return found


def row_bytes(fmt: str | int | QuantFormat, k: int) -> int:
    """Bytes that one row of `k` weights takes in `fmt`."""
    fmt = format_of(fmt)
    _check_row_length(fmt.name, fmt.block_size, k)
    return k // fmt.block_size * fmt.block_bytes


def quantize(x: np.ndarray, fmt: str | int | QuantFormat) -> np.ndarray:
    """float32 [..., K] -> uint8 [..., row_bytes(fmt, K)], K a multiple of the block size."""
    return format_of(fmt).quantize(x)


def dequantize(raw: np.ndarray, fmt: str | int | QuantFormat, shape: tuple[int, ...]) -> np.ndarray:
    """Raw blocks (uint8 [..., row_bytes] or flat) -> float32 of `shape` (rows last, numpy order).

    GGUF lists dimensions innermost first; reverse them to get `shape`.
    """
    fmt = format_of(fmt)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise TandemError(f"{fmt.name} tensor needs a shape with at least one dimension")
    _check_row_length(fmt.name, fmt.block_size, shape[-1])
    values = fmt.dequantize(raw)
    if values.size != math.prod(shape):
        raise TandemError(
            f"{fmt.name} data holds {values.size} weights but shape {shape} needs {math.prod(shape)}; "
            f"the tensor's shape or type in the file is wrong"
        )
    return values.reshape(shape)
