"""Hot-expert MoE kernels (tandem.ops.triton.moe.moe_decode) against tandem.ops.reference.moe_experts.

Without CUDA the kernels run in Triton's interpreter on CPU tensors; with CUDA, compiled on the GPU.
The kernels round wherever the reference rounds, so only the order of fp32 arithmetic inside a dot
product may differ (and fused multiply-adds on a GPU). Bounds:
- fp32 weights and x: |out - ref| <= 1e-5 max|ref|.
- bf16 / fp16: an fp32-order difference can move a value across a rounding boundary (a gate, up,
  silu, h or down value, or the output), which moves it by one rounding step, at most 2^-7 of its
  size in bf16. So: at most 2% of the elements (+2) may differ from ref at all, each by at most
  2^-7 * scale, scale = |ref| + sum_j |w_j| (|w_down[e_j]| @ |h_j|) elementwise (h_j: the
  reference's silu(gate x) * up x of slot j), the size of the products summed into the output.
  Measured in the interpreter: bit-equal on every input below; at V2-Lite width with four other
  seeds 1-10 of 2048 elements differ, by at most 4.5e-4 * scale. On a GPU the reference's GEMVs are
  cuBLAS's, whose fp32 order differs from the kernel's in every gate/up value, and each of those flips
  nudges every output: 142 of 2048 elements (7%) differ at V2-Lite width on an H200, so there the
  share is 25%. It still catches a slot computed with a slightly wrong weight (a 5% error in one
  slot's weight moves 87% of the elements, each by less than a step); an element whose terms are all
  zero (a token with no slot) must be exactly zero.
- Inputs whose fp32 sums are exact in any order (small dyadic values): bit-equal to ref, so every
  rounding must be where the reference's is; the slot-order test is built on such inputs, with
  weights that make fp32 sums in another order come out different.
Widths are tiny (H 40, I 24; H 296, I 280 for several column steps with ragged ends) and
DeepSeek-V2-Lite's (H 2048, I 1408) for one token: the interpreter runs every program in numpy.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Chosen when tandem.ops.triton.moe defines its kernels, so before that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.ops import reference as ref
from tandem.ops.triton import moe

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
REL32 = 1e-5  # fp32: arithmetic order
STEP = 2.0**-7  # 16-bit: one bf16 step of the summed products' size
FLIPS = 0.25 if torch.cuda.is_available() else 0.02  # 16-bit: share of the elements that may differ at all


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def gen(seed):
    return torch.Generator().manual_seed(seed)


def experts(n_exp, inter, hidden, dtype, device, seed=0):
    """w_gate, w_up [N, I, H], w_down [N, H, I], scaled so activations stay near 1."""
    g = gen(seed)
    w_gate = torch.randn(n_exp, inter, hidden, generator=g) / hidden**0.5
    w_up = torch.randn(n_exp, inter, hidden, generator=g) / hidden**0.5
    w_down = torch.randn(n_exp, hidden, inter, generator=g) / inter**0.5
    return [w.to(device=device, dtype=dtype) for w in (w_gate, w_up, w_down)]


def routing(n_tok, k, n_exp, device, seed=1):
    """ids int32 [T, k] with about a third of the slots -1 (slot k-1 of token 0 always), every
    token using expert N-1 in slot 0 (an expert shared across tokens), duplicates allowed; weights
    fp32 [T, k] in (0.1, 1.1)."""
    g = gen(seed)
    ids = torch.randint(0, n_exp, (n_tok, k), generator=g)
    ids[torch.rand(n_tok, k, generator=g) < 0.3] = -1
    ids[:, 0] = n_exp - 1
    ids[0, -1] = -1
    weights = torch.rand(n_tok, k, generator=g) + 0.1
    return ids.to(device=device, dtype=torch.int32), weights.to(device)


def hidden_states(n_tok, hidden, dtype, device, seed=2):
    return torch.randn(n_tok, hidden, generator=gen(seed)).to(device=device, dtype=dtype)


def term_scale(x, ids, weights, w_gate, w_up, w_down):
    """sum_j |w_j| (|w_down[e_j]| @ |h_j|) per element [T, H] in fp64 (h_j as the reference computes it)."""
    scale = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    xw = x.to(w_gate.dtype)
    for t, j in (ids >= 0).nonzero().tolist():
        e = int(ids[t, j])
        h = ref.silu_mul(F.linear(xw[t], w_gate[e]), F.linear(xw[t], w_up[e]))
        scale[t] += abs(float(weights[t, j])) * (w_down[e].double().abs() @ h.double().abs())
    return scale


def check(out, expect, inputs):
    """The module docstring's bound for out against expect = the reference on `inputs`."""
    assert out.shape == expect.shape and out.dtype == expect.dtype, (out.shape, out.dtype, expect.shape, expect.dtype)
    err = (out.double() - expect.double()).abs()
    if expect.dtype == F32 and inputs[3].dtype == F32:
        bound = REL32 * float(expect.abs().max())
        assert float(err.max()) <= bound, f"off by {float(err.max()):.3g} > {bound:.3g}"
        return
    scale = expect.double().abs() + term_scale(*inputs)
    assert not err[scale == 0].any(), "an element with no terms is not zero"
    worst = float((err / scale.clamp_min(1e-300)).max())
    assert worst <= STEP, f"an element is off by {worst:.3g} x its terms' size > {STEP}"
    n_diff = int((err > 0).sum())
    assert n_diff <= 2 + FLIPS * err.numel(), f"{n_diff} of {err.numel()} elements differ"


def run_both(x, ids, weights, w_gate, w_up, w_down):
    out = moe.moe_decode(x, ids, weights, w_gate, w_up, w_down)
    expect = ref.moe_experts(x, ids, weights, w_gate, w_up, w_down)
    return out, expect


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("n_exp", [4, 8])
@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_matches_reference(device, dtype, n_tok, k, n_exp):
    hidden, inter = 40, 24
    w = experts(n_exp, inter, hidden, dtype, device)
    x = hidden_states(n_tok, hidden, dtype, device)
    ids, weights = routing(n_tok, k, n_exp, device)
    out, expect = run_both(x, ids, weights, *w)
    check(out, expect, (x, ids, weights, *w))


def check_width(device, dtype, hidden, inter, n_exp, ids, weights, seed):
    """The kernels at one width on fixed routing ids / weights (lists) against the reference."""
    w = experts(n_exp, inter, hidden, dtype, device, seed=seed)
    x = hidden_states(len(ids), hidden, dtype, device, seed=seed + 1)
    ids = torch.tensor(ids, dtype=torch.int32, device=device)
    weights = torch.tensor(weights, device=device)
    out, expect = run_both(x, ids, weights, *w)
    check(out, expect, (x, ids, weights, *w))


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_ragged_widths(device, dtype):
    """H and I over one tile with ragged ends: several column steps in both kernels, partial row blocks."""
    check_width(device, dtype, 296, 280, 4, [[3, -1, 0], [1, 3, -1]], [[0.6, 0.3, 0.4], [0.2, 0.9, 0.5]], seed=3)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_v2_lite_width(device, dtype):
    check_width(device, dtype, 2048, 1408, 2, [[1, -1, 0]], [[0.7, 0.5, 0.2]], seed=5)


def dyadic(*shape, step, limit, seed, dtype, device):
    """Multiples of `step` in [-limit, limit]: products and short sums of them are exact in fp32."""
    n = int(limit / step)
    return (torch.randint(-n, n + 1, shape, generator=gen(seed)) * step).to(device=device, dtype=dtype)


def exact_inputs(n_tok, k, n_exp, hidden, inter, dtype, device, seed=0):
    """Inputs whose gate/up dot products and weighted terms are exact in fp32 (in any order);
    down's sums of 8 products seldom need more than fp32's 24 bits, and even then only a value at
    a rounding midpoint could round differently. So a kernel that rounds where the reference rounds
    matches it bit for bit (the seeds here do)."""
    x = dyadic(n_tok, hidden, step=0.25, limit=2, seed=seed, dtype=dtype, device=device)
    w_gate = dyadic(n_exp, inter, hidden, step=0.125, limit=1, seed=seed + 1, dtype=dtype, device=device)
    w_up = dyadic(n_exp, inter, hidden, step=0.125, limit=1, seed=seed + 2, dtype=dtype, device=device)
    w_down = dyadic(n_exp, hidden, inter, step=0.125, limit=1, seed=seed + 3, dtype=dtype, device=device)
    ids, _ = routing(n_tok, k, n_exp, device, seed=seed + 4)
    weights = dyadic(n_tok, k, step=0.125, limit=2, seed=seed + 5, dtype=F32, device=device)
    return x, ids, weights, w_gate, w_up, w_down


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_bit_equal_on_exact_inputs(device, dtype):
    """Every rounding of the reference (gate, up, silu, silu * up, down, the output) where it is:
    with exact fp32 sums a rounding left out or added shows as a difference."""
    inputs = exact_inputs(3, 6, 8, 16, 8, dtype, device)
    out, expect = run_both(*inputs)
    assert expect.abs().max() > 0
    diff = (out != expect).nonzero().tolist()
    assert not diff, f"{len(diff)} elements differ, e.g. {out[tuple(diff[0])]} != {expect[tuple(diff[0])]} at {diff[0]}"


# ---------------------------------------------------------------- slots: order, duplicates, skipped


def ordered_sum(terms, order, dtype):
    """fp32 sum of terms[j] (each [H]) from zero in the given order, rounded to dtype."""
    acc = torch.zeros_like(terms[0])
    for j in order:
        acc = acc + terms[j]
    return acc.to(dtype)


def test_slot_order_and_duplicates(device):
    """The fp32 sum over a token's slots runs in the reference's order: ascending expert id, and
    slot order among slots of one expert (a stable sort). Huge weights make sums in another order
    come out different (checked below); the inputs are exact (I = 1: each down output is one
    product) and so are the weighted terms, so the kernel must match the reference bit for bit."""
    hidden = 16
    x, _, _, w_gate, w_up, w_down = exact_inputs(2, 3, 3, hidden, 1, BF16, device, seed=10)
    w_gate[2], w_up[2], w_down[2] = w_gate[0], w_up[0], w_down[0]  # expert 2 is a copy of expert 0
    # Expert 1's outputs for token 0 are +-powers of two, so their products with any fp32 weight
    # are exact (and a GPU's fused multiply-add changes nothing).
    h1 = ref.silu_mul(F.linear(x[0], w_gate[1]), F.linear(x[0], w_up[1])).float()
    assert h1.abs().item() > 0
    g = gen(11)
    powers = 2.0 ** torch.randint(-2, 3, (hidden,), generator=g) * (torch.randint(0, 2, (hidden,), generator=g) * 2 - 1)
    w_down[1, :, 0] = (powers.to(device) / h1).to(BF16)
    assert torch.equal(ref.mlp(x[:1], w_gate[1], w_up[1], w_down[1])[0].float(), powers.to(device))
    big = 2.0**22
    # Token 0: expert 1 twice, huge terms that nearly cancel (to 0.75 y1), the expert-0 term
    # first: ref order (slot 1, 0, 2); with the duplicates swapped (1, 2, 0), y0 is rounded on
    # another grid. Token 1: the two copies cancel; in slot order they cancel first and the small
    # term survives whole, while in the reference's order (slot 1, 2, 0) it is rounded on the huge
    # terms' grid.
    ids = torch.tensor([[1, 0, 1], [2, 0, 1]], dtype=torch.int32, device=device)
    weights = torch.tensor([[big, 1.0, -(big - 0.75)], [-big, big, 1.0]], device=device)
    inputs = (x, ids, weights, w_gate, w_up, w_down)
    out = moe.moe_decode(*inputs)
    # On the CPU: CUDA's index_add_ adds the duplicates' terms in no fixed order.
    expect = ref.moe_experts(*[t.cpu() for t in inputs]).to(device)

    for t, ref_order, wrong_order in ((0, [1, 0, 2], [1, 2, 0]), (1, [1, 2, 0], [0, 1, 2])):
        terms = [
            ref.mlp(x[t : t + 1], w_gate[e], w_up[e], w_down[e])[0].float() * weights[t, j]
            for j, e in enumerate(ids[t].tolist())
        ]
        assert torch.equal(ordered_sum(terms, ref_order, BF16), expect[t])  # the reference's order, as claimed
        assert not torch.equal(ordered_sum(terms, wrong_order, BF16), expect[t])  # the inputs tell orders apart
    assert torch.equal(out, expect), f"{(out != expect).sum()} elements differ"


def test_duplicate_slots_both_count(device):
    """Two slots of one token on one expert add both weighted outputs (and a third, other expert)."""
    hidden, inter = 40, 24
    w = experts(3, inter, hidden, F32, device, seed=7)
    x = hidden_states(2, hidden, F32, device, seed=8)
    ids = torch.tensor([[2, 2, -1, 0], [0, 1, 2, 0]], dtype=torch.int32, device=device)
    weights = torch.tensor([[0.5, 0.25, 0.9, 0.125], [0.3, 0.2, 0.1, 0.4]], device=device)
    out, expect = run_both(x, ids, weights, *w)
    check(out, expect, (x, ids, weights, *w))
    single = moe.moe_decode(x[:1], ids[:1, :1], weights[:1, :1] + weights[:1, 1:2], *w)
    other = moe.moe_decode(x[:1], ids[:1, 3:], weights[:1, 3:], *w)
    assert (out[0] - (single[0] + other[0])).abs().max() <= REL32 * out[0].abs().max()


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_skipped_slots_give_zeros(device, dtype):
    """All slots -1 (or out of range: ids >= N are skipped too) -> exact zeros. The weights are
    views of the first 2 of 3 experts, so a kernel reading expert 2 for id 2 would find data."""
    hidden, inter = 40, 24
    w = [t[:2] for t in experts(3, inter, hidden, dtype, device)]
    x = hidden_states(3, hidden, dtype, device)
    weights = torch.ones(3, 2, device=device)
    moe.moe_decode(x, torch.zeros(3, 2, dtype=torch.int32, device=device), weights, *w)  # leaves garbage to reuse
    for fill in (-1, 2, -7):
        ids = torch.full((3, 2), fill, dtype=torch.int32, device=device)
        out = moe.moe_decode(x, ids, weights, *w)
        assert out.dtype == dtype and torch.equal(out, torch.zeros_like(out)), fill
    ids = torch.tensor([[-1, 0], [2, -1], [-1, -1]], dtype=torch.int32, device=device)
    out = moe.moe_decode(x, ids, weights, *w)
    assert torch.equal(out[1:], torch.zeros_like(out[1:])) and out[0].abs().max() > 0


# ---------------------------------------------------------------- dtypes and layouts


def test_fp32_x_with_bf16_weights(device):
    """x is rounded to the weights' dtype first; the output is x's dtype, its fp32 sum rounded only
    to fp32, so rounded to bf16 it is the reference's bf16 result on x.to(bf16)."""
    hidden, inter = 40, 24
    w = experts(4, inter, hidden, BF16, device, seed=9)
    x = hidden_states(3, hidden, F32, device, seed=10)
    ids, weights = routing(3, 4, 4, device, seed=11)
    out = moe.moe_decode(x, ids, weights, *w)
    assert out.dtype == F32
    xb = x.to(BF16)
    check(out.to(BF16), ref.moe_experts(xb, ids, weights, *w), (xb, ids, weights, *w))
    assert not torch.equal(out, out.to(BF16).float())  # not rounded to bf16 on the way
    # bf16 x with fp32 weights: x widens exactly, the fp32 sum is rounded once to bf16.
    w32 = [t.float() for t in w]
    out = moe.moe_decode(xb, ids, weights, *w32)
    expect = ref.moe_experts(xb.float(), ids, weights, *w32).to(BF16)
    assert out.dtype == BF16
    check(out, expect, (xb, ids, weights, *[t.to(BF16) for t in w32]))


def test_strided_views(device):
    """x with a row stride, gate and up as halves of one fused [N, 2I, H] tensor, w_down a slice:
    no copies needed, same result as contiguous tensors."""
    hidden, inter, n_exp = 40, 24, 4
    g = gen(12)
    gate_up = torch.randn(n_exp, 2 * inter, hidden, generator=g).to(device=device, dtype=BF16)
    w_gate, w_up = gate_up.split(inter, dim=1)
    w_down = torch.randn(n_exp, hidden, inter + 8, generator=g).to(device=device, dtype=BF16)[:, :, :inter]
    x = torch.randn(3, hidden + 24, generator=g).to(device=device, dtype=BF16)[:, 5 : 5 + hidden]
    ids, weights = routing(3, 2, n_exp, device, seed=13)
    assert not (x.is_contiguous() or w_gate.is_contiguous() or w_up.is_contiguous() or w_down.is_contiguous())
    out = moe.moe_decode(x, ids, weights, w_gate, w_up, w_down)
    xc, *wc = (t.contiguous() for t in (x, w_gate, w_up, w_down))
    assert torch.equal(out, moe.moe_decode(xc, ids, weights, *wc))
    check(out, ref.moe_experts(xc, ids, weights, *wc), (xc, ids, weights, *wc))


def test_rejects_what_it_does_not_take(device):
    hidden, inter = 40, 24
    w_gate, w_up, w_down = experts(4, inter, hidden, BF16, device)
    x = hidden_states(2, hidden, BF16, device)
    ids, weights = routing(2, 2, 4, device)
    moe.moe_decode(x, ids, weights, w_gate, w_up, w_down)
    bad_calls = {
        "ids int64": (x, ids.long(), weights, w_gate, w_up, w_down),
        "ids 1-D": (x, ids[0], weights, w_gate, w_up, w_down),
        "ids of other tokens": (x, ids[:1], weights[:1], w_gate, w_up, w_down),
        "k > 16": (x, ids.repeat(1, 9), weights.repeat(1, 9), w_gate, w_up, w_down),
        "weights shape": (x, ids, weights[:, :1], w_gate, w_up, w_down),
        "weights int": (x, ids, ids, w_gate, w_up, w_down),
        "x 3-D": (x[None], ids, weights, w_gate, w_up, w_down),
        "x width": (x[:, :32], ids, weights, w_gate, w_up, w_down),
        "x int": (x.int(), ids, weights, w_gate, w_up, w_down),
        "w_up shape": (x, ids, weights, w_gate, w_up[:3], w_down),
        "w_down layout": (x, ids, weights, w_gate, w_up, w_down.transpose(1, 2).contiguous()),
        "w_gate 2-D": (x, ids, weights, w_gate[0], w_up, w_down),
        "weights dtypes differ": (x, ids, weights, w_gate, w_up.float(), w_down),
        "w_down last stride": (x, ids, weights, w_gate, w_up, w_down.transpose(1, 2).contiguous().transpose(1, 2)),
    }
    for name, args in bad_calls.items():
        with pytest.raises(ValueError):
            moe.moe_decode(*args)
            pytest.fail(f"accepted {name}")


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_follows_new_ids():
    """Captured once, replayed after ids, weights and x change in place: nothing about which slots
    are computed is baked into the graph (no host syncs)."""
    hidden, inter, n_exp, n_tok, k = 2048, 1408, 4, 4, 6
    w = experts(n_exp, inter, hidden, BF16, "cuda", seed=14)
    x = hidden_states(n_tok, hidden, BF16, "cuda", seed=15)
    ids, weights = routing(n_tok, k, n_exp, "cuda", seed=16)
    moe.moe_decode(x, ids, weights, *w)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.moe_decode(x, ids, weights, *w)
    new_ids, new_weights = routing(n_tok, k, n_exp, "cuda", seed=17)
    new_ids[1] = -1
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    x.copy_(hidden_states(n_tok, hidden, BF16, "cuda", seed=18))
    graph.replay()
    torch.cuda.synchronize()
    check(out, ref.moe_experts(x, ids, weights, *w), (x, ids, weights, *w))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("n_tok, k", [(1, 6), (5, 8), (300, 8)])  # 300 x 8: more than one block
def test_hot_split_equals_the_torch_ops(device, n_tok, k):
    n_exp = 64
    g = gen(20 + n_tok)
    ids = torch.randint(-1, n_exp, (n_tok, k), generator=g, dtype=torch.int32)
    hot = torch.randperm(n_exp, generator=g)[:16]
    lookup = torch.full((n_exp + 1,), -1, dtype=torch.long)
    lookup[hot] = torch.arange(16)
    flat = torch.where(ids < 0, n_exp, ids.long()).view(-1)
    want_tally = torch.bincount(flat, minlength=n_exp + 1) + 7
    want_local = lookup[flat].view(ids.shape).int()
    want_cold = torch.where(want_local >= 0, -1, ids).int()
    tally = torch.full((n_exp + 1,), 7, dtype=torch.long, device=device)
    cold, local = moe.hot_split(ids.to(device), lookup.to(device), tally)
    assert torch.equal(cold.cpu(), want_cold) and torch.equal(local.cpu(), want_local)
    assert torch.equal(tally.cpu(), want_tally)


def test_hot_split_checks_its_input():
    lookup = torch.full((5,), -1, dtype=torch.long)
    with pytest.raises(ValueError, match="int32/int64"):
        moe.hot_split(torch.zeros(2, 2), lookup, lookup.clone())
    with pytest.raises(ValueError, match="int64"):
        moe.hot_split(torch.zeros(2, 2, dtype=torch.int32), lookup.int(), lookup.clone())
