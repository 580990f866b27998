"""The CPU expert engine's generic kernels (the spec; ISA kernels: test_cpu_isa.py) on GGUF blocks (Q8_0, Q5_0, Q4_K, Q5_K, Q6_K), consumed from raw bytes,
vs the torch reference MoE on gguf.quants.dequantize of the same bytes. The generic kernels
dequantize to fp32 on the fly (no activation quantization), with the float operations of gguf's
dequantizer, so the tolerance is fp32 summation order only: TOL_F32 = 2e-5 of max |ref|."""

import gguf
import pytest
import torch

from tandem.ops import cpu
from tests.ops.moe_cases import TOL_BF16, TOL_F32, assert_matches, gguf_blocks, reference, routing, tokens

GGUF_FORMATS = ["Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]
# E, I, H: multiples of the block (32 or 256), not powers of two.
SHAPES = {
    "Q8_0": (5, 160, 96),
    "Q5_0": (5, 160, 96),
    "Q4_K": (4, 256, 768),
    "Q5_K": (4, 512, 256),
    "Q6_K": (4, 256, 768),
}


def gguf_layer(fmts, E, I, H, seed=0):
    """Raw blocks for gate/up [E, I, H] and down [E, H, I], and their gguf dequantization."""
    (g, gd), (u, ud), (d, dd) = (
        gguf_blocks(fmts[0], E, I, H, seed),
        gguf_blocks(fmts[1], E, I, H, seed + 1),
        gguf_blocks(fmts[2], E, H, I, seed + 2),
    )
    return (g, u, d), (gd, ud, dd)


@pytest.fixture(scope="module")
def engine():
    return cpu.create_engine(n_threads=2, isa="generic")


@pytest.fixture(scope="module")
def layers(engine):
    out = {}
    for fmt, (E, I, H) in SHAPES.items():
        raw, deq = gguf_layer((fmt,) * 3, E, I, H, seed=len(out) * 3)
        out[fmt] = (cpu.add_layer(engine, fmt, *raw), raw, deq)
    return out


def test_block_structs_match_gguf():
    sizes = cpu.block_sizes()
    for fmt in GGUF_FORMATS:
        assert sizes[fmt] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]], fmt


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
@pytest.mark.parametrize("T,k", [(1, 2), (3, 1), (17, 4), (256, 3)])
def test_gguf_formats_match_reference(engine, layers, fmt, T, k):
    layer, _, deq = layers[fmt]
    E, I, H = SHAPES[fmt]
    x = tokens(T, H, seed=T)
    ids, w = routing(T, E, k, seed=k)
    assert_matches(cpu.wait(engine, cpu.submit(engine, layer, x, ids, w)), reference(x, ids, w, *deq), TOL_F32, fmt)


@pytest.mark.parametrize("fmt", ["Q5_0", "Q6_K"])
@pytest.mark.parametrize("kind", ["one", "padded", "few"])
def test_gguf_skewed_routing(engine, layers, fmt, kind):
    layer, _, deq = layers[fmt]
    E, I, H = SHAPES[fmt]
    x = tokens(20, H, dtype=torch.bfloat16)
    ids, w = routing(20, E, 3, kind=kind)
    out = cpu.wait(engine, cpu.submit(engine, layer, x, ids, w))
    assert out.dtype == torch.bfloat16
    assert_matches(out.float(), reference(x, ids, w, *deq), TOL_BF16, kind)


def test_q4_k_m_mix(engine):
    """Q4_K_M files mix types: gate/up Q4_K, down Q6_K; numpy arrays are accepted too."""
    fmts = ("Q4_K", "Q4_K", "Q6_K")
    E, I, H = 6, 512, 256
    raw, deq = gguf_layer(fmts, E, I, H, seed=11)
    layer = cpu.add_layer(engine, fmts, *(t.numpy() for t in raw))
    x = tokens(17, H)
    ids, w = routing(17, E, 4)
    assert_matches(cpu.wait(engine, cpu.submit(engine, layer, x, ids, w)), reference(x, ids, w, *deq), TOL_F32)


def test_v2_lite_like_mix(engine):
    """DeepSeek-V2-Lite's Q4_K_M: I = 1408 is no multiple of 256, so down is Q5_0 or Q8_0."""
    fmts = ("Q4_K", "Q4_K", "Q8_0")
    E, I, H = 3, 352, 256
    raw, deq = gguf_layer(fmts, E, I, H, seed=21)
    layer = cpu.add_layer(engine, fmts, *raw)
    x = tokens(5, H)
    ids, w = routing(5, E, 2)
    assert_matches(cpu.wait(engine, cpu.submit(engine, layer, x, ids, w)), reference(x, ids, w, *deq), TOL_F32)


def test_memory_equals_file_bytes(engine, layers):
    for fmt, (layer, raw, _) in layers.items():
        assert engine.layer_info(layer)["bytes"] == sum(t.numel() for t in raw), fmt
