"""Hot experts on split rows with int8 activations (tandem.ops.triton.moe_q8).

Two references: reference.moe_experts in fp32 on the codecs' dequantized weights (the int8
rounding of x and h keeps the result within Q8_BOUND of it), and the same computed on x and h
quantized per 32 as the kernels quantize them (`q8_reference`: then only the fp32 summation order
differs, and on a GPU the odd rounding flip of a quantized value; <= Q8_REF). A wrong group, scale
or offset misses Q8_REF by orders of magnitude. Without CUDA the kernels run in Triton's
interpreter (the dot products emulated with integer ops); with CUDA, compiled (dp4a).
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from tandem.ops import reference as ref
from tandem.ops.split_rows import SPLIT_FORMATS, split_bytes, split_rows, unsplit_rows
from tandem.ops.triton import arrive
from tandem.ops.triton.moe_q8 import moe_decode_split
from tandem.placement.memory import GPU_SPLIT_FORMATS
from tests.ops.test_triton_moe_quant import quantized

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]
Q8_REF = 1e-4
Q8_BOUND = 3e-2


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def q8(v: torch.Tensor) -> torch.Tensor:
    """v [..., K] quantized per 32 and back, as the kernels do: d = max|v| / 127, q = rint(v * (1/d))."""
    g = v.reshape(*v.shape[:-1], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    return (torch.round(g * inv) * d).reshape(v.shape)


def q8_reference(x, ids, w, gate_f, up_f, down_f) -> torch.Tensor:
    out = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < gate_f.shape[0]:
                xq = q8(x[t])
                h = q8(torch.nn.functional.silu(gate_f[e] @ xq) * (up_f[e] @ xq))
                out[t] += w[t, j] * (down_f[e] @ h)
    return out


def case(n_exp, inter, hidden, formats, n_tok, top_k, device, seed=0, ids=None):
    rng = np.random.default_rng(seed)
    g, u, d = formats
    (gate, gate_f), (up, up_f) = quantized(n_exp, inter, hidden, g, rng), quantized(n_exp, inter, hidden, u, rng)
    down, down_f = quantized(n_exp, hidden, inter, d, rng)
    x = torch.from_numpy(rng.standard_normal((n_tok, hidden)).astype(np.float32))
    if ids is None:
        ids = torch.from_numpy(np.stack([rng.permutation(n_exp)[:top_k] for _ in range(n_tok)])).int()
    w = torch.from_numpy(rng.random(ids.shape).astype(np.float32))
    blocks = [split_rows(b, f).to(device) for b, f in zip((gate, up, down), formats)]
    got = moe_decode_split(x.to(device), ids.to(device), w.to(device), *blocks, *formats).cpu()
    valid = torch.where(ids < n_exp, ids, -1)  # the reference takes -1 only
    return got, q8_reference(x, ids, w, gate_f, up_f, down_f), ref.moe_experts(x, valid, w, gate_f, up_f, down_f)


def close(got, want, bound) -> bool:
    return bool((got - want).abs().max() <= bound * want.abs().max())


@pytest.mark.parametrize(
    "formats, inter, hidden",
    [(("Q4_K", "Q4_K", "Q6_K"), 256, 512), (("Q6_K", "Q4_K", "Q4_K"), 256, 512),
     (("Q4_K", "Q4_K", "Q8_0"), 288, 512), (("Q8_0", "Q8_0", "Q4_K"), 256, 288),
     (("Q4_K", "Q4_K", "Q5_0"), 288, 512), (("Q5_0", "Q5_0", "Q4_K"), 256, 288),
     (("Q4_0", "Q4_0", "Q4_0"), 288, 288), (("Q5_K", "Q5_K", "Q5_K"), 256, 512)],
    ids=["q4_k_m", "q6_k-gate", "ragged-inter-q8_0-down", "ragged-hidden-q8_0-gate", "ragged-inter-q5_0-down",
         "ragged-hidden-q5_0-gate", "ragged-q4_0", "q5_k"],
)
def test_split_kernels_equal_the_q8_reference(formats, inter, hidden, device):
    """Every split format as gate/up and as down; I = 288 (V2-Lite's 1408 is not a multiple of 256
    either: Q8_0 down rows end inside a step), H = 288 (Q8_0 gate/up rows and x end inside one)."""
    got, want_q8, want = case(3, inter, hidden, formats, n_tok=2, top_k=2, device=device)
    assert want.abs().max() > 0.1  # the case computes something
    assert close(got, want_q8, Q8_REF)
    assert close(got, want, Q8_BOUND)


def test_skipped_slots_and_empty_token(device):
    """Ids -1 and >= N contribute nothing; a token with no hot slot is exactly zero."""
    ids = torch.tensor([[1, -1], [-1, 7]], dtype=torch.int32)
    got, want_q8, _ = case(2, 256, 256, ("Q4_K", "Q4_K", "Q8_0"), n_tok=2, top_k=2, device=device, seed=5, ids=ids)
    assert close(got[0], want_q8[0], Q8_REF)
    assert torch.equal(got[1], torch.zeros(256))


def test_split_rows_keep_the_file_bytes():
    rng = np.random.default_rng(2)
    for fmt, k in (("Q4_K", 512), ("Q6_K", 512), ("Q8_0", 288), ("Q5_0", 288), ("Q4_0", 288), ("Q5_K", 512)):
        blocks, _ = quantized(2, 3, k, fmt, rng)
        split = split_rows(blocks, fmt)
        assert split.shape == (2, 3, split_bytes(fmt, k)) and split.shape[2] % 16 == 0
        assert split.shape[2] - blocks.shape[2] < 16  # padding only
        assert torch.equal(unsplit_rows(split, fmt), blocks)
        assert not torch.equal(split[..., : blocks.shape[2]], blocks)  # regrouped, not copied
    assert set(SPLIT_FORMATS) == GPU_SPLIT_FORMATS  # the memory plan counts these as split rows


def test_bad_input_is_refused_clearly(device):
    rng = np.random.default_rng(0)
    gate = split_rows(quantized(2, 256, 256, "Q4_K", rng)[0], "Q4_K").to(device)
    down = split_rows(quantized(2, 256, 256, "Q8_0", rng)[0], "Q8_0").to(device)
    x, ids, w = torch.randn(1, 256, device=device), torch.zeros(1, 2, dtype=torch.int32, device=device), torch.ones(
        1, 2, device=device)
    with pytest.raises(ValueError, match="down must be contiguous Q6_K split rows"):
        moe_decode_split(x, ids, w, gate, gate, down, "Q4_K", "Q4_K", "Q6_K")  # down in another format
    with pytest.raises(ValueError, match="split rows take"):
        moe_decode_split(x, ids, w, gate, gate, down, "Q3_K", "Q4_K", "Q8_0")
    with pytest.raises(ValueError, match="ids must be int32"):
        moe_decode_split(x, ids.long(), w, gate, gate, down, "Q4_K", "Q4_K", "Q8_0")
    with pytest.raises(ValueError, match="whole 144-byte blocks"):
        split_rows(torch.zeros(2, 100, dtype=torch.uint8), "Q4_K")


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_walks_in_parts_equal_the_q8_reference(device, parts, monkeypatch):
    """H = 768 (3 steps) and I = 288 (2 steps) walked in parts: the partial sums add up to the whole,
    added by the last program to arrive; skipped slots count in too."""
    from tandem.ops.triton import moe_q8

    monkeypatch.setattr(moe_q8, "_WALK_PARTS", parts)
    ids = torch.tensor([[2, 0], [-1, 1], [5, -1]], dtype=torch.int32)
    for _ in range(2):  # the second call finds the arrival counters reset
        got, want_q8, _ = case(3, 288, 768, ("Q4_K", "Q4_K", "Q8_0"), n_tok=3, top_k=2, device=device, seed=4, ids=ids)
        assert close(got, want_q8, Q8_REF)
    assert not arrive._BUFFERS["moe_q8", -1 if device == "cpu" else torch.device(device).index or 0].any()


def test_outgrown_counters_stay_allocated(device, monkeypatch):
    """A call needing more arrival counters than the device has gets a bigger buffer; the old one
    stays allocated (a CUDA graph captured with it still reads it) and both calls are right."""
    monkeypatch.setattr(arrive, "MIN_COUNTERS", 1)
    monkeypatch.setattr(arrive, "_BUFFERS", {})
    monkeypatch.setattr(arrive, "_OUTGROWN", [])
    got, want_q8, _ = case(3, 256, 256, ("Q4_K", "Q4_K", "Q8_0"), n_tok=1, top_k=2, device=device, seed=6)
    assert close(got, want_q8, Q8_REF)
    (first,) = arrive._BUFFERS.values()
    got, want_q8, _ = case(3, 256, 256, ("Q4_K", "Q4_K", "Q8_0"), n_tok=3, top_k=2, device=device, seed=6)
    assert close(got, want_q8, Q8_REF)
    (second,) = arrive._BUFFERS.values()
    assert second.numel() > first.numel() and len(arrive._OUTGROWN) == 1 and arrive._OUTGROWN[0] is first
