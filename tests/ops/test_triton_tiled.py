"""The engine's weights read on the GPU in the engine's layout (tandem.ops.triton.tiled) against
the file format's reference dequantizer (tandem.weights.quant), through the engine's own slabs
(Engine.weight_slab): packing then GPU-side decoding must give back the file's weights.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors: bit-equal (same fp32
operations in the same order). With CUDA (marked gpu): a fused multiply-add may round the last
operation once instead of twice, so |got - ref| <= 2^-22 max|ref| per projection.
Every ISA this CPU and build have whose layout is tiled (AVX2: row groups of 8; AVX-512 / AMX: 16);
the GGUF formats of Q4_K_M and the engine's own formats for float checkpoints (BF16, INT8, INT4).
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from tandem.ops import cpu
from tandem.ops.triton import tiled
from tandem.weights.quant import format_of, quantize

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TILED_ISAS = [i for i in ("avx2", "avx512", "amx") if i in cpu.isa_info()["cpu"] and i in cpu.isa_info()["built"]]
pytestmark = pytest.mark.gpu if CUDA else []


def layer(isa: str, fmts: tuple[str, str, str], hidden: int, inter: int, experts: int = 3, seed: int = 0):
    """An engine layer of random weights quantized to fmts, and the file rows it was made from."""
    g = np.random.default_rng(seed)
    shapes = [(experts, inter, hidden), (experts, inter, hidden), (experts, hidden, inter)]
    raws = [quantize((g.standard_normal(s) / np.sqrt(s[2])).astype(np.float32), f) for s, f in zip(shapes, fmts)]
    engine = cpu.create_engine(1, isa=isa)
    index = cpu.add_layer(engine, fmts, *[torch.from_numpy(r) for r in raws])
    return engine, index, raws


@pytest.mark.parametrize("isa", TILED_ISAS)
@pytest.mark.parametrize("fmts, hidden, inter", [
    (("Q4_K", "Q4_K", "Q6_K"), 512, 256),  # Q4_K_M where I is a multiple of 256
    (("Q4_K", "Q4_K", "Q8_0"), 512, 224),  # ... where it is not (V2-Lite: I = 1408)
    (("Q5_0", "Q8_0", "Q5_0"), 256, 96),
])
def test_engine_slabs_dequantize_to_the_file_weights(isa, fmts, hidden, inter):
    engine, index, raws = layer(isa, fmts, hidden, inter)
    for proj, fmt, raw in zip(("gate", "up", "down"), fmts, raws):
        info = engine._native.weight_slab_info(index, 0, proj)
        assert info["format"] == fmt and info["slice"] == (0, inter)
        slab = torch.from_numpy(engine._native.weight_slab(index, 0, proj)).to(DEVICE)
        got = tiled.dequantize(slab, fmt, info["rows"], info["cols"], info["row_group"]).cpu()
        want = torch.from_numpy(format_of(fmt).dequantize(raw))
        assert got.shape == want.shape
        if CUDA:
            assert float((got - want).abs().max()) <= 2.0**-22 * float(want.abs().max()), proj
        else:
            assert torch.equal(got, want), proj


def float_rows(fmt: str, shape: tuple[int, int, int], g: np.random.Generator):
    """(what add_layer takes, the weights it stands for) for the engine's own formats: BF16 as bf16
    floats; INT8 / INT4 as prequantized rows ([fp32 scale][int8 q]; 36-byte blocks [fp32 d][32
    bytes: element j low nibble of byte j, element j + 32 its high nibble])."""
    e, rows, k = shape
    if fmt == "BF16":
        w = torch.from_numpy(g.standard_normal(shape).astype(np.float32)).bfloat16()
        return w, w.float()
    if fmt == "INT8":
        scale = (g.random((e, rows, 1)) + 0.5).astype(np.float32) / 127
        q = g.integers(-127, 128, (e, rows, k)).astype(np.int8)
        raw = np.concatenate([scale.view(np.uint8), q.view(np.uint8)], axis=2)
        return torch.from_numpy(raw), torch.from_numpy(q.astype(np.float32) * scale)
    d = (g.random((e, rows, k // 64, 1)) + 0.5).astype(np.float32) / 8
    codes = g.integers(0, 16, (e, rows, k // 64, 64)).astype(np.uint8)
    qs = codes[..., :32] | (codes[..., 32:] << 4)
    raw = np.concatenate([d.view(np.uint8), qs], axis=3).reshape(e, rows, -1)
    return torch.from_numpy(raw), torch.from_numpy((d * (codes.astype(np.float32) - 8)).reshape(e, rows, k))


@pytest.mark.parametrize("isa", TILED_ISAS)
@pytest.mark.parametrize("fmt, hidden, inter", [("BF16", 200, 72), ("INT8", 200, 72), ("INT4", 256, 128)])
def test_float_checkpoint_formats(isa, fmt, hidden, inter):
    """Hidden / intermediate sizes off the formats' padding (BF16 pads K to 32, INT8 to 64)."""
    g = np.random.default_rng(1)
    made = [float_rows(fmt, s, g) for s in [(3, inter, hidden), (3, inter, hidden), (3, hidden, inter)]]
    engine = cpu.create_engine(1, isa=isa)
    index = cpu.add_layer(engine, fmt, *[m for m, _ in made], prequantized=fmt != "BF16")
    for proj, (_, want) in zip(("gate", "up", "down"), made):
        info = engine._native.weight_slab_info(index, 0, proj)
        slab = torch.from_numpy(engine._native.weight_slab(index, 0, proj)).to(DEVICE)
        got = tiled.dequantize(slab, fmt, info["rows"], info["cols"], info["row_group"]).cpu()
        assert torch.equal(got, want), proj  # one fp32 product or none: exact on a GPU too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_into_a_strided_slice_rounds_as_torch_casts(dtype):
    """out=: written straight into a column slice of a wider tensor (a node's share of a layer's
    down projection), rounded to nearest even as the fp32 weights' torch cast; the rest untouched."""
    if not TILED_ISAS:
        pytest.skip("no ISA with the tiled layout on this CPU")
    engine, index, _ = layer(TILED_ISAS[-1], ("Q4_K", "Q4_K", "Q8_0"), 512, 224)
    info = engine._native.weight_slab_info(index, 0, "down")
    slab = torch.from_numpy(engine._native.weight_slab(index, 0, "down")).to(DEVICE)
    want = tiled.dequantize(slab, "Q8_0", info["rows"], info["cols"], info["row_group"])
    full = torch.full((want.shape[0], want.shape[1], want.shape[2] + 40), 7.0, dtype=dtype, device=DEVICE)
    got = tiled.dequantize(slab, "Q8_0", info["rows"], info["cols"], info["row_group"], out=full[:, :, 24:-16])
    assert got.data_ptr() == full[:, :, 24:-16].data_ptr()
    assert torch.equal(full[:, :, 24:-16].cpu(), want.to(dtype).cpu())
    assert bool((full[:, :, :24] == 7).all()) and bool((full[:, :, -16:] == 7).all())
    with pytest.raises(ValueError, match="out must be"):
        tiled.dequantize(slab, "Q8_0", info["rows"], info["cols"], info["row_group"], out=full)


def test_rejects_what_it_cannot_read():
    engine, index, _ = layer(TILED_ISAS[0], ("Q8_0", "Q8_0", "Q8_0"), 64, 32) if TILED_ISAS else (None, None, None)
    slab = torch.zeros(2, 2, 64, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="reads Q8_0"):
        tiled.dequantize(slab, "Q5_K", 32, 32, 16)
    with pytest.raises(ValueError, match="row group"):
        tiled.dequantize(slab, "Q8_0", 32, 32, 1)
    with pytest.raises(ValueError, match="whole blocks"):
        tiled.dequantize(slab, "Q8_0", 32, 40, 16)
    with pytest.raises(ValueError, match="groups"):
        tiled.dequantize(slab, "Q8_0", 48, 32, 16)
    if engine is not None:
        with pytest.raises(ValueError, match="proj must be"):
            engine._native.weight_slab(index, 0, "gate_up")
        with pytest.raises(ValueError, match="node 3 does not exist"):
            engine._native.weight_slab(index, 3, "gate")


def test_the_plan_reserves_dual_buffers_for_exactly_these_formats():
    from tandem.placement.memory import DUAL_FORMATS

    assert DUAL_FORMATS == set(tiled.FORMATS)
