"""Hot experts on GGUF blocks (tandem.ops.triton.moe_quant.moe_decode_blocks) against
reference.moe_experts in fp32 on the numpy codecs' dequantized weights.

Without CUDA the kernels run in Triton's interpreter on CPU tensors; with CUDA, compiled on the GPU.
The kernels compute in fp32 from the decoded weights (bit-equal to the codecs: test_triton_quant),
so only the fp32 summation order differs: |out - ref| <= 1e-5 max|ref| (fp32 x), and for bf16 x
one rounding of the output (2^-8 relative in the interpreter, which truncates; 2^-9 on a GPU).
Every format the GPU decodes is used somewhere; K-quant rows need multiples of 256 weights, so
those shapes are H 512, I 256, and a down projection whose I is not (V2-Lite's 1408) takes Q8_0 /
Q5_0 as llama.cpp's fallback does.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Chosen when tandem.ops.triton.moe defines its kernels, so before that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.ops import reference as ref
from tandem.ops.triton.moe_quant import moe_decode_blocks
from tandem.weights import quant as wq

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]
REL32 = 1e-5


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def quantized(n_exp: int, rows: int, k: int, fmt: str, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [n_exp, rows, row_bytes], their dequantization float32 [n_exp, rows, k])."""
    w = rng.standard_normal((n_exp * rows, k // 16, 16)).astype(np.float32) / k**0.5
    w *= np.exp(rng.uniform(-1, 1, (n_exp * rows, k // 16, 1))).astype(np.float32)  # a scale per 16
    w += rng.uniform(-0.5, 0.5, (n_exp * rows, k // 16, 1)).astype(np.float32) / k**0.5  # mins differ
    blocks = wq.quantize(w.reshape(n_exp * rows, k), fmt)
    floats = wq.dequantize(blocks, fmt, (n_exp * rows, k))
    return (torch.from_numpy(np.ascontiguousarray(blocks)).view(n_exp, rows, -1),
            torch.from_numpy(np.asarray(floats, dtype=np.float32)).view(n_exp, rows, k))


def case(n_exp, inter, hidden, formats, n_tok, top_k, device, seed=0, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    g, u, d = formats
    gate, gate_f = quantized(n_exp, inter, hidden, g, rng)
    up, up_f = quantized(n_exp, inter, hidden, u, rng)
    down, down_f = quantized(n_exp, hidden, inter, d, rng)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, hidden, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(n_exp + 2, generator=gen)[:top_k] - 2 for _ in range(n_tok)]).int()
    ids[ids < 0] = -1  # some slots are the CPU's
    w = torch.rand(n_tok, top_k, generator=gen)
    want = ref.moe_experts(x.float(), ids, w, gate_f, up_f, down_f).to(dtype)
    args = [t.to(device) for t in (x, ids, w, gate, up, down)]
    return want, moe_decode_blocks(*args, *formats).cpu()


@pytest.mark.parametrize(
    "formats",
    [("Q4_K", "Q4_K", "Q6_K"), ("Q5_K", "Q4_K", "Q8_0"), ("Q8_0", "Q4_0", "Q5_0")],
    ids=["q4_k_m", "mixed-k", "small-blocks"],
)
def test_blocks_equal_reference(formats, device):
    want, got = case(4, 256, 512, formats, n_tok=3, top_k=3, device=device)
    assert want.abs().max() > 0.1  # the case computes something
    assert (got - want).abs().max() <= REL32 * want.abs().max()


def test_ragged_inter_with_fallback_down(device):
    """I not a multiple of 256 (V2-Lite's 1408; here 288 = 1 step + 32): gate/up Q4_K, down Q8_0
    as llama.cpp falls back, its last step partly past the row's end."""
    want, got = case(2, 288, 512, ("Q4_K", "Q4_K", "Q8_0"), n_tok=1, top_k=2, device=device, seed=3)
    assert (got - want).abs().max() <= REL32 * want.abs().max()


def test_bf16_activations_round_once(device):
    want, got = case(3, 256, 512, ("Q4_K", "Q4_K", "Q6_K"), n_tok=2, top_k=2, device=device, seed=1,
                     dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    unit = 2.0**-8
    assert ((got.float() - want.float()).abs() <= unit * want.float().abs() + 1e-6).all()


def test_skipped_slots_and_empty_token(device):
    """Ids -1 and >= N contribute nothing; a token with no hot slot is exactly zero."""
    rng = np.random.default_rng(5)
    gate, gate_f = quantized(2, 256, 256, "Q4_K", rng)
    up, up_f = quantized(2, 256, 256, "Q4_K", rng)
    down, down_f = quantized(2, 256, 256, "Q6_K", rng)
    x = torch.randn(2, 256)
    ids = torch.tensor([[1, -1], [-1, 7]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.5], [0.3, 0.7]])
    got = moe_decode_blocks(*(t.to(device) for t in (x, ids, w, gate, up, down)), "Q4_K", "Q4_K", "Q6_K").cpu()
    want = ref.moe_experts(x, torch.tensor([[1, -1], [-1, -1]], dtype=torch.int32), w, gate_f, up_f, down_f)
    assert (got[0] - want[0]).abs().max() <= REL32 * want[0].abs().max()
    assert torch.equal(got[1], torch.zeros(256))


def test_bad_input_is_refused_clearly(device):
    rng = np.random.default_rng(0)
    gate, _ = quantized(2, 256, 256, "Q4_K", rng)
    down, _ = quantized(2, 256, 256, "Q6_K", rng)
    x, ids, w = torch.randn(1, 256), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 2)
    with pytest.raises(ValueError, match="must be Q6_K blocks"):
        moe_decode_blocks(x, ids, w, gate, gate, gate, "Q4_K", "Q4_K", "Q6_K")  # down in the wrong format
    with pytest.raises(ValueError, match="ids must be int32"):
        moe_decode_blocks(x, ids.long(), w, gate, gate, down, "Q4_K", "Q4_K", "Q6_K")
    with pytest.raises(Exception, match="block formats"):
        moe_decode_blocks(x, ids, w, gate, gate, down, "IQ2_XS", "Q4_K", "Q6_K")
