"""The weight-format table against llama.cpp's own reading of the formats (the `gguf` package).

Dequantizers must match `gguf.quants.dequantize` bit for bit; quantizers must write blocks that
gguf reads back and stay within the error bound stated (and derived) below for each format.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tandem.errors import TandemError
from tandem.weights.quant import FORMATS, QuantFormat, dequantize, format_of, quantize, row_bytes

BLOCK_FORMATS = [name for name, f in FORMATS.items() if f.block_size > 1]
FLOAT_FORMATS = [name for name, f in FORMATS.items() if f.block_size == 1]

# Byte offsets of the fp16 scale fields inside one block, per format (ggml's block structs).
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}

# A scale rounded to fp16 (nearest, or up for K-quants) grows by at most this factor.
FP16_UP = 1 + 2**-10

# Max |dequant(quant(x)) - x| as a fraction of the block's absmax A (K-quants: the 256-element
# super-block's). Our quantizers never clip, so the error is at most half the (fp16) step.
BOUNDS = {
    # step = A/127 -> A/254
    "Q8_0": FP16_UP / 254,
    # levels d*[-8..7]; of the two signs of d the better one needs |d| <= A/7 -> A/14
    "Q4_0": FP16_UP / 14,
    # levels d*[-16..15] -> |d| <= A/15 -> A/30
    "Q5_0": FP16_UP / 30,
    # sub-block range <= 2A, offset rounded up by < dmin <= A/63, step rounded up by < d <= step_max/63:
    # half step <= (2A + A/63)/L * (1 + 1/63) / 2, L = 15 levels (Q4_K) or 31 (Q5_K)
    "Q4_K": (2 + FP16_UP / 63) * (1 + FP16_UP / 63) / 30,  # ~0.0683
    "Q5_K": (2 + FP16_UP / 63) * (1 + FP16_UP / 63) / 62,  # ~0.0330
    # sub-scale s <= A/31 (levels s*[-32..31]), int8 sub-scale rounded up by < d <= A/(31*127)
    "Q6_K": (1 + FP16_UP / 127) / 62,  # ~0.0163
}
SLACK = 1 + 1e-5  # float32 rounding in the arithmetic itself


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType(FORMATS[name].ggml_type)


def gguf_dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, ggml_type(name))


def assert_same_bits(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Exact equality of float32 bit patterns (so -0.0 != 0.0 and NaNs must match too)."""
    assert ours.dtype == np.float32 and theirs.dtype == np.float32
    assert ours.shape == theirs.shape
    diff = np.flatnonzero(ours.view(np.uint32) != theirs.view(np.uint32))
    first = diff[0] if diff.size else 0
    assert diff.size == 0, f"{diff.size} values differ, first at {first}: {ours.flat[first]} vs {theirs.flat[first]}"


@pytest.fixture(scope="module")
def gaussian() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)


# ---------------------------------------------------------------- the table itself


def test_table_agrees_with_gguf():
    assert sorted(FORMATS) == sorted(["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
    for name, f in FORMATS.items():
        qtype = gguf.GGMLQuantizationType(f.ggml_type)
        assert qtype.name == name
        assert gguf.GGML_QUANT_SIZES[qtype] == (f.block_size, f.block_bytes)
    assert FORMATS["Q4_K"].bits_per_weight == 4.5


def test_table_is_read_only():
    with pytest.raises(TypeError):
        FORMATS["Q4_K"] = FORMATS["Q8_0"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        FORMATS["Q4_K"].block_size = 32  # type: ignore[misc]


def test_format_of_by_name_and_type():
    assert format_of("Q4_K") is FORMATS["Q4_K"]
    assert format_of("q6_k") is FORMATS["Q6_K"]
    assert format_of(14) is FORMATS["Q6_K"]
    assert format_of(gguf.GGMLQuantizationType.BF16) is FORMATS["BF16"]
    assert format_of(np.int32(8)) is FORMATS["Q8_0"]
    assert format_of(FORMATS["Q5_0"]) is FORMATS["Q5_0"]


@pytest.mark.parametrize("key", ["Q3_K", "nope", 3, 99, 1.5, True])
def test_unknown_format_lists_supported(key):
    with pytest.raises(TandemError, match=r"unsupported weight format.*Q4_K \(12\)"):
        format_of(key)


def test_row_bytes():
    assert row_bytes("Q4_K", 7168) == 28 * 144
    assert row_bytes("Q8_0", 64) == 2 * 34
    assert row_bytes(FORMATS["BF16"], 3) == 6
    with pytest.raises(TandemError, match="blocks of 256"):
        row_bytes("Q6_K", 300)
    with pytest.raises(TandemError, match="blocks of 32"):
        row_bytes("Q5_0", 33)


# ---------------------------------------------------------------- dequantize == gguf, bit for bit


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_our_blocks_matches_gguf(name, gaussian):
    raw = quantize(gaussian, name)
    assert raw.dtype == np.uint8 and raw.shape == (64, row_bytes(name, 1024))
    assert_same_bits(FORMATS[name].dequantize(raw), gguf_dequantize(raw, name))


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_random_blocks_matches_gguf(name):
    """Every bit pattern of the payload decodes like gguf (signs, high bits, packed 6-bit scales)."""
    f = FORMATS[name]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(512, f.block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS.get(name, []):
        # finite scales of both signs, including zero; float formats keep any bits (NaN/Inf too)
        scales = rng.uniform(-2, 2, size=512).astype(np.float16)
        scales[:8] = 0
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(8, -1)  # 8 rows of 64 blocks
    assert_same_bits(FORMATS[name].dequantize(raw), gguf_dequantize(raw, name))


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_flat_and_shaped(name, gaussian):
    f = FORMATS[name]
    raw = quantize(gaussian[:4], name)  # [4, row_bytes]
    flat = f.dequantize(raw.reshape(-1))
    assert flat.shape == (4 * 1024,)
    assert_same_bits(dequantize(raw.reshape(-1), name, (2, 2, 1024)).reshape(-1), flat)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", [(64, 1024), (5, 3, 2304)])
@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_round_trip_error_bound(name, shape):
    f = FORMATS[name]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    y = dequantize(quantize(x, name), name, shape)
    err = np.abs(y - x).reshape(-1, f.block_size)
    absmax = np.abs(x).reshape(-1, f.block_size).max(axis=1, keepdims=True)
    worst = (err / absmax).max()
    assert worst <= BOUNDS[name] * SLACK, f"{name}: max error {worst:.5f} of block absmax > {BOUNDS[name]:.5f}"
    # The bound is tight, not a loose guess: the worst block comes within 10% of it.
    assert worst > 0.9 * BOUNDS[name]


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_sub_blocks_get_their_own_scale(name):
    """Sub-blocks of very different size each keep an error proportional to their own range.

    Q4_K/Q5_K sub-block j (32 values, L = 15 or 31 levels): range_j = max - min(min, 0), and
    err_j <= (range_j + dmin) / (2L) + d/2 with dmin <= A/63 and d <= (2A + A/63) / (63 L).
    Q6_K sub-block j (16 values): err_j <= a_j/62 + d/2 with d <= A/(31*127), a_j its absmax.
    """
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 256)).astype(np.float32)
    x *= 10.0 ** rng.uniform(-2, 0, size=(256, 16, 1)).repeat(16, axis=2).reshape(256, 256)
    x = x.astype(np.float32)
    y = dequantize(quantize(x, name), name, x.shape)
    big_a = np.abs(x).reshape(-1, 1, 256).max(axis=2, keepdims=True)  # [n, 1, 1]
    if name == "Q6_K":
        sub = x.reshape(-1, 16, 16)
        bound = np.abs(sub).max(axis=2, keepdims=True) / 62 + FP16_UP * big_a / (2 * 31 * 127)
    else:
        levels = 15 if name == "Q4_K" else 31
        sub = x.reshape(-1, 8, 32)
        span = sub.max(axis=2, keepdims=True) + np.maximum(-sub.min(axis=2, keepdims=True), 0)
        dmin = FP16_UP * big_a / 63
        d = FP16_UP * (2 * big_a + dmin) / (63 * levels)
        bound = (span + dmin) / (2 * levels) + d / 2
    err = np.abs(y.reshape(sub.shape) - sub)
    assert (err <= bound * SLACK).all(), f"{name}: worst sub-block error / bound = {(err / bound).max():.3f}"


def test_rms_error_ordering(gaussian):
    rms = {
        name: float(np.sqrt(np.mean((dequantize(quantize(gaussian, name), name, gaussian.shape) - gaussian) ** 2)))
        for name in BLOCK_FORMATS
    }
    order = ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0"]
    assert [rms[n] for n in order] == sorted(rms[n] for n in order), rms
    # One bit fewer roughly doubles the error.
    assert 1.7 < rms["Q4_0"] / rms["Q5_0"] < 2.3 and 1.7 < rms["Q4_K"] / rms["Q5_K"] < 2.3, rms


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0"])
def test_rms_close_to_llama_cpp_quantizer(name, gaussian):
    """gguf ports llama.cpp's reference quantizers for these three: ours are as good (within 2%)."""
    ours = dequantize(quantize(gaussian, name), name, gaussian.shape)
    theirs = gguf_dequantize(gguf.quants.quantize(gaussian, ggml_type(name)), name)
    rms_ours = np.sqrt(np.mean((ours - gaussian) ** 2))
    rms_theirs = np.sqrt(np.mean((theirs - gaussian) ** 2))
    assert rms_ours < 1.02 * rms_theirs


@pytest.mark.filterwarnings("error")  # no divide-by-zero or invalid-value warnings either
@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_degenerate_blocks(name):
    x = np.zeros((6, 256), dtype=np.float32)
    x[1] = 0.5  # constant positive
    x[2] = -0.5  # constant negative
    x[3, 7] = 3.0  # one outlier among zeros
    x[4, ::2], x[4, 1::2] = 1.0, -1.0
    x[5] = np.linspace(-1, 0.25, 256)
    y = dequantize(quantize(x, name), name, x.shape)
    assert np.array_equal(y[0], x[0])
    err = np.abs(y - x).reshape(-1, FORMATS[name].block_size)
    absmax = np.abs(x).reshape(-1, FORMATS[name].block_size).max(axis=1, keepdims=True)
    assert (err <= BOUNDS[name] * SLACK * absmax).all()


def test_float_formats_round_like_torch():
    rng = np.random.default_rng(4)
    x = np.concatenate([
        rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 4096),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 70000.0, 65520.0, 1 + 2**-11, 1 + 2**-8, 3.4e38]),
    ]).astype(np.float32)
    for name, dtype in [("F16", torch.float16), ("BF16", torch.bfloat16), ("F32", torch.float32)]:
        raw = quantize(x, name)
        expected = torch.from_numpy(x).to(dtype)
        # NaN payloads differ between converters (torch's bf16 gives 0xffff); NaN must stay NaN.
        same = raw.reshape(x.size, -1) == expected.view(torch.uint8).numpy().reshape(x.size, -1)
        assert same.all(axis=1)[~np.isnan(x)].all(), name
        y = dequantize(raw, name, x.shape)
        assert np.array_equal(y, expected.float().numpy(), equal_nan=True), name


# ---------------------------------------------------------------- gguf reads what we write


def test_gguf_file_round_trip(tmp_path, gaussian):
    path = tmp_path / "formats.gguf"
    x = gaussian[:4, :512]  # [4, 512]
    writer = gguf.GGUFWriter(path, "llama")
    ours = {}
    for name in FORMATS:
        raw = quantize(x, name)  # uint8 [4, row_bytes], as gguf expects quantized tensors
        ours[name] = raw
        writer.add_tensor(f"w.{name}", raw, raw_dtype=ggml_type(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert sorted(tensors) == sorted(f"w.{n}" for n in FORMATS)
    for name in FORMATS:
        t = tensors[f"w.{name}"]
        assert t.tensor_type == ggml_type(name)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the innermost dimension first
        assert shape == (4, 512)
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert_same_bits(dequantize(ours[name], name, shape), theirs)
        assert_same_bits(dequantize(t.data, name, shape), theirs)  # reading gguf's arrays directly


# ---------------------------------------------------------------- user mistakes


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_row_length_not_a_multiple_of_the_block(name):
    with pytest.raises(TandemError, match=f"blocks of {FORMATS[name].block_size} elements"):
        quantize(np.zeros((2, 48), dtype=np.float32), name)


def test_bad_inputs():
    raw = quantize(np.ones((2, 256), dtype=np.float32), "Q4_K")
    with pytest.raises(TandemError, match="144-byte blocks"):
        FORMATS["Q4_K"].dequantize(raw[:, :100])
    with pytest.raises(TandemError, match="holds 512 weights but shape"):
        dequantize(raw, "Q4_K", (3, 256))
    with pytest.raises(TandemError, match="blocks of 256"):
        dequantize(raw, "Q4_K", (4, 128))
    with pytest.raises(TandemError, match="NaN or Inf"):
        quantize(np.full((1, 32), np.nan, dtype=np.float32), "Q8_0")
    with pytest.raises(TandemError, match="too large for an fp16"):
        quantize(np.full((1, 32), 1e9, dtype=np.float32), "Q8_0")
    with pytest.raises(TandemError, match="too large for an fp16"):
        quantize(np.full((1, 256), 1e9, dtype=np.float32), "Q6_K")
    with pytest.raises(TandemError, match="unsupported weight format"):
        quantize(np.zeros((1, 32), dtype=np.float32), "Q2_K")


def test_quant_format_validates():
    with pytest.raises(ValueError):
        QuantFormat("X", None, 0, 4, lambda r: r, lambda x: x)
