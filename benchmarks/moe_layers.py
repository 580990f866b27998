"""Synthetic routed-expert layers for benchmarks/moe_cpu.py: the shapes it times, and random weights
written straight into each format's row layout (GGUF blocks, INT8 / INT4 / BF16 rows) with sane
scale fields, so activations stay O(1) through a layer; values do not matter for speed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    down_fallback: str  # Q4_K_M's down type when I is not a multiple of 256


SHAPES = {
    "v3": Shape("DeepSeek-V3", 7168, 2048, 256, 8, "Q6_K"),
    "v2-lite": Shape("DeepSeek-V2-Lite", 2048, 1408, 64, 6, "Q8_0"),
    "qwen3": Shape("Qwen3-30B-A3B", 2048, 768, 128, 8, "Q6_K"),
}


# Block layouts (weights per block, bytes per block, {byte offset of a scale field: fp16/fp32, magnitude}).
# Magnitudes make weights ~1/sqrt(K) so activations stay O(1) through the layer.
BLOCKS = {
    "Q4_K": (256, 144, {0: ("f16", 1 / 945), 2: ("f16", 1 / 504)}),
    "Q6_K": (256, 210, {208: ("f16", 1 / 4096)}),
    "Q5_0": (32, 22, {0: ("f16", 1 / 16)}),
    "Q8_0": (32, 34, {0: ("f16", 1 / 127)}),
    "INT4": (64, 36, {0: ("f32", 1 / 7)}),
}


def fmt_types(fmt: str, shape: Shape) -> tuple[str, str, str]:
    """(gate, up, down) weight types; Q4_K_M as llama.cpp assigns them to routed experts."""
    if fmt == "q4_k_m":
        down = "Q6_K" if shape.inter % 256 == 0 else shape.down_fallback
        return ("Q4_K", "Q4_K", down)
    return (fmt.upper(),) * 3


def row_bytes(ftype: str, K: int) -> int:
    if ftype == "BF16":
        return 2 * K
    if ftype == "INT8":
        return 4 + K
    elems, nbytes, _ = BLOCKS[ftype]
    if K % elems:
        raise ValueError(f"{ftype} needs K % {elems} == 0; K = {K}")
    return K // elems * nbytes


def pattern_rows(ftype: str, K: int, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """n_rows random rows of K weights in the format's row layout, with sane scale fields."""
    rb = row_bytes(ftype, K)
    if ftype == "BF16":
        x = (rng.standard_normal((n_rows, K), dtype=np.float32) / math.sqrt(K)).astype(np.float32)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_rows, rb)
    raw = rng.integers(0, 256, size=(n_rows, rb), dtype=np.uint8)
    if ftype == "INT8":
        raw[:, :4] = np.frombuffer(np.float32(1 / (127 * math.sqrt(K))).tobytes(), np.uint8)
        return raw
    elems, nbytes, scales = BLOCKS[ftype]
    blocks = raw.reshape(n_rows, K // elems, nbytes)
    for off, (kind, mag) in scales.items():
        dt = np.float16 if kind == "f16" else np.float32
        val = np.frombuffer(dt(mag / math.sqrt(K)).tobytes(), np.uint8)
        blocks[..., off : off + len(val)] = val
    return raw


def random_weight(ftype: str, E: int, rows: int, K: int, seed: int) -> torch.Tensor:
    """uint8 [E, rows, row_bytes]: a random pattern of rows tiled to size (fast; caches cannot tell)."""
    n = E * rows
    pattern = pattern_rows(ftype, K, min(n, 4096), np.random.default_rng(seed))
    reps = -(-n // pattern.shape[0])
    t = torch.from_numpy(pattern).repeat(reps, 1)[:n]
    return t.reshape(E, rows, -1).contiguous()


def layer_sources(fmt: str, shape: Shape, experts: int) -> tuple[tuple[str, str, str], list[torch.Tensor]]:
    types = fmt_types(fmt, shape)
    H, I = shape.hidden, shape.inter
    dims = ((I, H), (I, H), (H, I))
    return types, [random_weight(t, experts, r, k, seed=i) for i, (t, (r, k)) in enumerate(zip(types, dims))]


def layer_bytes(types, shape: Shape, experts: int) -> int:
    H, I = shape.hidden, shape.inter
    return experts * (I * row_bytes(types[0], H) + I * row_bytes(types[1], H) + H * row_bytes(types[2], I))
