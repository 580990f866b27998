"""Fused decode-step kernels (tandem.ops.triton.fused) against the torch reference (tandem.ops.reference).

Without CUDA the kernels run in Triton's interpreter on CPU tensors; with CUDA, compiled on the
GPU. The kernels round wherever the reference rounds, so only the order of fp32 arithmetic may
differ (a row's sum of squares, fused multiply-adds on a GPU). Bounds:
- rms_norm, rope, mla_cache_write: |out - ref| <= 1e-6 * scale elementwise, scale = |ref| for
  normalized values and the row's max |x| for rotated ones (a rotation's outputs may cancel).
  Where the computation rounds to bf16 (x, weight product, output or cache in bf16; or fp16), an
  fp32-order difference can move a value across a rounding boundary: at most 0.1% of the elements
  (+2) may then miss that bound, each by at most 2^-6 |ref| (two bf16 steps). All-fp32: none may.
- the residual sum: bit-equal to torch's x + residual.
- route: ids equal, in the reference's order (best first); |w - ref| <= 1e-6 max|ref|.
Widths are DeepSeek-V2-Lite's (hidden 2048, kv_lora_rank 512, rope 64, 16 heads, 64 experts top 6)
and V3's where it matters (hidden 7168, 256 experts in 8 groups), with 1-5 tokens: the interpreter
runs every program in numpy.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Chosen when tandem.ops.triton.fused defines its kernels, so before that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.ops import reference as ref
from tandem.ops.triton import fused
from tandem.ops.triton import route as routing

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]
BF16, F32 = torch.bfloat16, torch.float32
REL = 1e-6  # fp32 arithmetic order
FLIP = 2.0**-6  # two bf16 steps
EPS = 1e-6


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def randn(*shape, dtype=F32, device="cpu", seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)


def angles(n_tok, half, device, start=0):
    """cos, sin [T, half] fp32 of positions start.. with the usual 10000^(-2i/d) frequencies."""
    pos = torch.arange(start, start + n_tok, dtype=torch.float64)[:, None] * 37  # spread positions
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = pos * inv_freq
    return ang.cos().float().to(device), ang.sin().float().to(device)


def assert_close(out, expect, scale, rounds_16bit):
    """The module docstring's bound: |out - expect| <= REL * scale, except (only when the
    computation rounds to bf16 or fp16) at most 0.1% + 2 elements within FLIP * |expect|."""
    assert out.shape == expect.shape and out.dtype == expect.dtype, (out.shape, out.dtype, expect.shape, expect.dtype)
    err = (out.double() - expect.double()).abs()
    scale = scale.double().expand_as(err)
    bad = err > REL * scale
    n_bad = int(bad.sum())
    if not rounds_16bit:
        assert n_bad == 0, f"{n_bad} elements beyond {REL} x scale; worst {float((err / scale).max()):.3g}"
        return
    assert n_bad <= 2 + 1e-3 * err.numel(), f"{n_bad} of {err.numel()} elements beyond {REL} x scale"
    worst = float((err[bad] / expect.double().abs()[bad]).max()) if n_bad else 0.0
    assert worst <= FLIP, f"an element is off by {worst:.3g} x |ref| > 2 bf16 steps"


def rows_max(x):
    return x.float().abs().amax(-1, keepdim=True)


# ---------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("shape", [(1, 2048), (3, 2048), (2, 7168), (5, 40)])
@pytest.mark.parametrize("w_dtype", [F32, BF16], ids=["w_fp32", "w_bf16"])
@pytest.mark.parametrize("x_dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_rms_norm(device, x_dtype, w_dtype, shape):
    x = randn(*shape, dtype=x_dtype, device=device, scale=3.0, shift=0.5)
    w = randn(shape[-1], dtype=w_dtype, device=device, seed=1, scale=0.3, shift=1.0)
    out = fused.rms_norm(x, w, EPS)
    expect = ref.rms_norm(x, w, EPS)
    assert out.is_contiguous()
    assert_close(out, expect, expect.abs(), BF16 in (x_dtype, expect.dtype))


@pytest.mark.parametrize("w_dtype", [F32, BF16], ids=["w_fp32", "w_bf16"])
@pytest.mark.parametrize("x_dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_rms_norm_residual_returns_the_sum(device, x_dtype, w_dtype):
    x = randn(4, 2048, dtype=x_dtype, device=device, scale=2.0)
    residual = randn(4, 2048, dtype=x_dtype, device=device, seed=2, scale=5.0)
    w = randn(2048, dtype=w_dtype, device=device, seed=1, scale=0.3, shift=1.0)
    x0, r0 = x.clone(), residual.clone()
    out, total = fused.rms_norm(x, w, EPS, residual=residual)
    assert total.dtype == x_dtype and torch.equal(total, x0 + r0)  # torch's add, rounding included
    assert torch.equal(x, x0) and torch.equal(residual, r0)  # inputs untouched
    expect = ref.rms_norm(x0 + r0, w, EPS)
    assert_close(out, expect, expect.abs(), BF16 in (x_dtype, expect.dtype))


@pytest.mark.parametrize("x_dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_rms_norm_strided_views(device, x_dtype):
    n_tok = 3
    # Per-head q norm on the no-rope part of q [T, nh, 192]: a [T, 16, 128] view with row strides.
    q = randn(n_tok, 16, 192, dtype=x_dtype, device=device, scale=2.0)
    q_nope = q.split([128, 64], dim=-1)[0]
    w = randn(128, dtype=F32, device=device, seed=1, scale=0.3, shift=1.0)
    expect = ref.rms_norm(q_nope, w, EPS)
    out = fused.rms_norm(q_nope, w, EPS)
    assert not q_nope.is_contiguous() and out.is_contiguous()
    assert_close(out, expect, expect.abs(), x_dtype == BF16)
    # The latent part of kv [T, 512 + 64]: 2-D rows with stride 576, residual contiguous.
    kv = randn(n_tok, 576, dtype=x_dtype, device=device, seed=3)
    latent, residual = kv[:, :512], randn(n_tok, 512, dtype=x_dtype, device=device, seed=4)
    w = randn(512, dtype=BF16, device=device, seed=5, scale=0.3, shift=1.0)
    out, total = fused.rms_norm(latent, w, EPS, residual)
    assert torch.equal(total, latent + residual)
    expect = ref.rms_norm(latent + residual, w, EPS)
    assert_close(out, expect, expect.abs(), True)
    # More than three dims: normalized over the last.
    x4 = randn(2, 3, 4, 32, dtype=x_dtype, device=device, seed=6)
    w = randn(32, dtype=F32, device=device, seed=7)
    expect = ref.rms_norm(x4, w, EPS)
    assert_close(fused.rms_norm(x4, w, EPS), expect, expect.abs(), x_dtype == BF16)


def test_rms_norm_rejects_bad_shapes(device):
    x = randn(2, 64, device=device)
    with pytest.raises(ValueError):
        fused.rms_norm(x, randn(32, device=device), EPS)
    with pytest.raises(ValueError):
        fused.rms_norm(x, randn(64, device=device), EPS, residual=randn(2, 64, dtype=BF16, device=device))
    with pytest.raises(ValueError):
        fused.rms_norm(randn(1, 16384, device=device), randn(16384, device=device), EPS)


# ---------------------------------------------------------------- rope


def rope_inputs(case, dtype, device, n_tok=3):
    if case == "k_pe":  # [T, 64], a column slice of kv [T, 576]
        return randn(n_tok, 576, dtype=dtype, device=device)[:, 512:]
    if case == "q_pe":  # [T, 16, 64], the rope part of q [T, 16, 192]
        return randn(n_tok, 16, 192, dtype=dtype, device=device).view(n_tok, 16, 192).split([128, 64], dim=-1)[1]
    if case == "heads":  # Qwen/Mixtral-style contiguous [T, nh, 128]
        return randn(n_tok, 4, 128, dtype=dtype, device=device)
    if case == "four_dims":  # [T, 2, 3, 16]
        return randn(n_tok, 2, 3, 16, dtype=dtype, device=device)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["k_pe", "q_pe", "heads", "four_dims"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_rope(device, dtype, interleaved, case):
    x = rope_inputs(case, dtype, device)
    x0 = x.clone()
    cos, sin = angles(x.shape[0], x.shape[-1] // 2, device, start=5)
    out = fused.rope(x, cos, sin, interleaved)
    expect = ref.apply_rope(x, cos, sin, interleaved)
    assert out.is_contiguous() and torch.equal(x, x0)
    assert_close(out, expect, rows_max(x), dtype == BF16)


def test_rope_non_contiguous_input_and_layouts_differ(device):
    """The strided q_pe view gives what its contiguous copy gives, and the two pairings differ."""
    x = rope_inputs("q_pe", F32, device, n_tok=2)
    assert not x.is_contiguous()
    cos, sin = angles(2, 32, device, start=100)
    out = fused.rope(x, cos, sin, True)
    assert torch.equal(out, fused.rope(x.contiguous(), cos, sin, True))
    assert (out - fused.rope(x, cos, sin, False)).abs().max() > 0.1


def test_rope_rejects_bad_angles(device):
    x = randn(2, 64, device=device)
    cos, sin = angles(2, 32, device)
    with pytest.raises(ValueError):
        fused.rope(x, cos[:, :16], sin[:, :16], True)
    with pytest.raises(ValueError):
        fused.rope(x, cos[:1], sin[:1], True)


# ---------------------------------------------------------------- mla_cache_write


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("cache_dtype", [BF16, F32, torch.float16], ids=["cache_bf16", "cache_fp32", "cache_fp16"])
@pytest.mark.parametrize("w_dtype", [F32, BF16], ids=["w_fp32", "w_bf16"])
@pytest.mark.parametrize("kv_dtype", [BF16, F32], ids=["kv_bf16", "kv_fp32"])
def test_mla_cache_write(device, kv_dtype, w_dtype, cache_dtype, interleaved):
    n_tok, c, dr, n_slots = 3, 512, 64, 16
    kv = randn(n_tok, c + dr + 32, dtype=kv_dtype, device=device, scale=2.0)[:, : c + dr]  # row stride 608
    w = randn(c, dtype=w_dtype, device=device, seed=1, scale=0.3, shift=1.0)
    cos, sin = angles(n_tok, dr // 2, device, start=7)
    cache = randn(n_slots, c + dr, dtype=cache_dtype, device=device, seed=2)
    cache0 = cache.clone()
    slots = torch.tensor([11, 0, 6], dtype=torch.int64, device=device)

    fused.mla_cache_write(kv, w, EPS, cos, sin, cache, slots, c, interleaved)

    latent = ref.rms_norm(kv[:, :c], w, EPS)
    k_pe = ref.apply_rope(kv[:, c:], cos, sin, interleaved)
    expect = torch.cat((latent, k_pe), dim=-1).to(cache_dtype)
    untouched = torch.ones(n_slots, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert torch.equal(cache[untouched], cache0[untouched])
    scale = torch.cat((expect[:, :c].abs().float(), rows_max(kv[:, c:]).expand(-1, dr)), dim=-1)
    rounds = {kv_dtype, w_dtype, cache_dtype} != {F32}
    assert_close(cache[slots], expect, scale, rounds)


def test_mla_cache_write_negative_slot_writes_nothing(device):
    n_tok, c, dr = 2, 32, 16
    kv = randn(n_tok, c + dr, device=device)
    w = randn(c, device=device, seed=1)
    cos, sin = angles(n_tok, dr // 2, device)
    cache = randn(4, c + dr, device=device, seed=2)
    cache0 = cache.clone()
    fused.mla_cache_write(kv, w, EPS, cos, sin, cache, torch.tensor([-1, 2], device=device), c, True)
    expect = torch.cat((ref.rms_norm(kv[1:, :c], w, EPS), ref.apply_rope(kv[1:, c:], cos[1:], sin[1:], True)), -1)
    assert torch.equal(cache[[0, 1, 3]], cache0[[0, 1, 3]])
    assert_close(cache[2:3], expect, expect.abs().amax(), False)


# ---------------------------------------------------------------- route

# (scoring, topk_method, experts, top_k, n_group, topk_group, norm_topk_prob, scaling, bias)
ROUTES = {
    "v2_lite_softmax": ("softmax", "greedy", 64, 6, 1, 1, False, 1.0, False),
    "softmax_norm": ("softmax", "greedy", 64, 6, 1, 1, True, 1.0, False),
    "qwen2_60_experts": ("softmax", "greedy", 60, 4, 1, 1, False, 1.0, False),
    "mixtral": ("softmax", "greedy", 8, 2, 1, 1, True, 1.0, False),
    "v2_group_limited": ("softmax", "group_limited_greedy", 160, 6, 8, 3, False, 16.0, False),
    "sigmoid_bias": ("sigmoid", "greedy", 64, 6, 1, 1, True, 2.5, True),
    "v3_noaux_tc": ("sigmoid", "noaux_tc", 256, 8, 8, 4, True, 2.5, True),
    "noaux_tc_pairs": ("sigmoid", "noaux_tc", 16, 3, 8, 2, True, 1.0, True),
    "noaux_tc_one_group": ("sigmoid", "noaux_tc", 32, 4, 1, 1, False, 1.0, True),
}


def route_both(case, device, n_tok=5):
    scoring, method, n_exp, top_k, n_group, topk_group, norm, scaling, has_bias = ROUTES[case]
    logits = randn(n_tok, n_exp, device=device, seed=3, scale=2.0)
    bias = randn(n_exp, device=device, seed=4, scale=0.5) if has_bias else None
    kw = {
        "top_k": top_k, "scoring": scoring, "topk_method": method, "n_group": n_group, "topk_group": topk_group,
        "norm_topk_prob": norm, "routed_scaling_factor": scaling, "correction_bias": bias,
    }  # fmt: skip
    return routing.route(logits, **kw), ref.route(logits, **kw), logits, kw


@pytest.mark.parametrize("case", list(ROUTES))
def test_route(device, case):
    (ids, weights), (ids_ref, weights_ref), _, _ = route_both(case, device)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ids_ref), f"{ids} != {ids_ref}"
    err = (weights - weights_ref).abs().max()
    assert err <= REL * weights_ref.abs().max(), f"weights off by {err:.3g}"


@pytest.mark.parametrize("case", ["sigmoid_bias", "v3_noaux_tc", "v2_group_limited"])
def test_route_cases_exercise_the_bias_and_the_groups(device, case):
    """The inputs make the bias and the group limit change the choice, so the tests above would
    catch a kernel that ignored them or took weights from the biased scores."""
    (ids, _), _, logits, kw = route_both(case, device)
    scores = logits.sigmoid() if kw["scoring"] == "sigmoid" else logits.softmax(-1)
    plain = scores.topk(kw["top_k"], dim=-1).indices.to(torch.int32)
    assert not torch.equal(ids, plain)
    if kw["correction_bias"] is not None and kw["n_group"] > 1:
        biased = (scores + kw["correction_bias"]).topk(kw["top_k"], dim=-1).indices.to(torch.int32)
        assert not torch.equal(ids, biased)


@pytest.mark.parametrize("case", list(ROUTES))
@pytest.mark.parametrize("n_tok", [1, 3])
def test_route_x_computes_the_logits_and_routes(device, case, n_tok):
    """route_x(x, W) against the reference route of x @ W^T in fp32 (H = 300: not a multiple of
    the kernel's 256-wide steps): the same ids, weights within 1e-5 (the logits' 300 products are
    summed in another order, and softmax's exponent moves that ~1e-6 relative); twice (the second
    call finds the arrival counters reset)."""
    from tandem.ops.triton import arrive

    scoring, method, n_exp, top_k, n_group, topk_group, norm, scaling, has_bias = ROUTES[case]
    x = randn(n_tok, 300, device=device, seed=5).bfloat16()
    w = randn(n_exp, 300, device=device, seed=6, scale=0.2)
    kw = {
        "top_k": top_k, "scoring": scoring, "topk_method": method, "n_group": n_group, "topk_group": topk_group,
        "norm_topk_prob": norm, "routed_scaling_factor": scaling,
        "correction_bias": randn(n_exp, device=device, seed=4, scale=0.5) if has_bias else None,
    }  # fmt: skip
    ids_ref, weights_ref = ref.route(x.float() @ w.T, **kw)
    for _ in range(2):
        ids, weights = routing.route_x(x, w, **kw)
        assert torch.equal(ids, ids_ref), f"{ids} != {ids_ref}"
        assert (weights - weights_ref).abs().max() <= 1e-5 * weights_ref.abs().max()
    assert not arrive._BUFFERS["route_x", -1 if device == "cpu" else torch.device(device).index or 0].any()


def test_route_rejects_what_it_does_not_support(device):
    logits = randn(2, 64, device=device)
    good = {
        "top_k": 6, "scoring": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    }  # fmt: skip
    routing.route(logits, **good)
    for bad in (
        {"scoring": "tanh"},
        {"topk_method": "random"},
        {"top_k": 0},
        {"top_k": 65},
        {"topk_method": "noaux_tc", "n_group": 6, "topk_group": 2},  # 64 experts in 6 groups
        {"topk_method": "noaux_tc", "n_group": 8, "topk_group": 9},
        {"topk_method": "noaux_tc", "n_group": 8, "topk_group": 1, "top_k": 9},  # more than the kept experts
    ):
        with pytest.raises(ValueError):
            routing.route(logits, **{**good, **bad})
    with pytest.raises(ValueError):
        routing.route(randn(2, 2048, device=device), **good)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, inter", [(1, 1408), (3, 24)])
def test_silu_mul(device, dtype, tokens, inter):
    g = torch.Generator().manual_seed(inter + tokens)
    gate_up = (3 * torch.randn(tokens, 2 * inter, generator=g)).to(device=device, dtype=dtype)
    got = fused.silu_mul(gate_up)
    want = ref.silu_mul(gate_up[:, :inter], gate_up[:, inter:])
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    err = (got.float() - want.float()).abs()
    if dtype == torch.float32:  # exp differs from torch's in the last bits
        assert (err <= 1e-6 * want.float().abs().clamp_min(1)).all()
    else:  # rounded twice to bf16 as torch rounds: at most a few elements one bf16 step apart
        assert (err <= 2**-7 * want.float().abs()).all() and int((err > 0).sum()) <= 2 + want.numel() // 1000
    # The gate and up halves are not interchangeable: swapping them must change the result.
    swapped = fused.silu_mul(torch.cat((gate_up[:, inter:], gate_up[:, :inter]), dim=1))
    assert not torch.equal(swapped, got)


def test_silu_mul_rejects_odd_widths():
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        fused.silu_mul(torch.zeros(2, 5))
