"""The bound arithmetic of TARGETS.md and the extrapolation, against hand-computed values."""

import pytest

from tandem.bench import bounds as b
from tandem.bench.extrapolate import check_pair, estimate, full_time, per_layer
from tandem.errors import TandemError
from tandem.testing.synth import plan

SMALL = b.ExpertShape(moe_layers=2, experts=4, top_k=2, hidden=256, inter=128, expert_bytes=1e6, formats=("Q4_K",))


class PlannedCheckpoint:
    """A GGUFCheckpoint stand-in over a synthetic plan: headers only, no file."""

    def __init__(self, model):
        self.model_dir, self.t = model.arch, {t.name: t for t in model.tensors}

    def names(self):
        return list(self.t)

    def nbytes(self, n):
        return self.t[n].nbytes

    def qtype(self, n):
        return self.t[n].format

    def shape(self, n):
        return self.t[n].shape


def real_shape(arch):
    m = plan(arch)
    return b.expert_shape_from_gguf(PlannedCheckpoint(m), m.config["num_experts_per_tok"])


def test_small_config_by_hand():
    assert SMALL.bytes_per_token == 4e6
    assert b.decode_roofline(SMALL, 100) == pytest.approx(25_000)
    assert b.distinct_experts(4, 2, 2) == pytest.approx(3)  # 4 * (1 - (1/2)^2)
    assert b.users_bound(SMALL, 100, 2) == pytest.approx(2 * 100e9 / (2 * 3 * 1e6))
    read = 4 * (1 - 0.5**10) * 1e6 / 100e9  # T = 10: distinct experts' bytes at 100 GB/s
    flops = 10 * 2 * 2 * 3 * 256 * 128
    assert b.prefill_bound(SMALL, 10, 100, 1e12) == pytest.approx(10 / (2 * max(read, flops / 1e12)))
    assert b.prefill_bound(SMALL, 10, 100, 1e10) == pytest.approx(10 / (2 * flops / 1e10))  # compute-bound
    gpu = 4e6 / 50e9  # the whole layer over PCIe at 50 GB/s
    assert b.prefill_bound(SMALL, 10, 100, 1e12, 50) == pytest.approx(10 / (2 / (1 / read + 1 / gpu)))
    assert b.compute_peak(SMALL, 35.0, 15.7) == (35e12, "AMX INT8")
    assert b.compute_peak(b.ExpertShape(1, 4, 2, 8, 8, 1.0, ("BF16",)), 35.0, 15.7) == (15.7e12, "AMX BF16")
    assert b.compute_peak(SMALL, None, None) == (None, "bandwidth only")


def test_targets_md_figures():
    """The numbers TARGETS.md quotes, from the same formulas."""
    assert b.distinct_experts(64, 6, 16) == pytest.approx(51, abs=0.5)
    assert b.distinct_experts(256, 8, 16) == pytest.approx(102, abs=0.5)
    v2, v3 = real_shape("deepseek-v2-lite"), real_shape("deepseek-v3")
    assert b.users_bound(v2, 100, 16) / b.decode_roofline(v2, 100) == pytest.approx(1.9, abs=0.02)
    assert b.users_bound(v3, 100, 16) / b.decode_roofline(v3, 100) == pytest.approx(1.25, abs=0.01)
    assert v3.moe_layers == 58 and v3.bytes_per_token / 1e9 == pytest.approx(12, rel=0.1)
    assert b.decode_roofline(v3, 145.6) == pytest.approx(12, rel=0.1)
    assert v2.bytes_per_token / 1e9 == pytest.approx(0.88, rel=0.03)
    assert b.decode_roofline(v2, 145.6) == pytest.approx(165, rel=0.03)
    # V3 layer at T = 2048 (64 tokens per expert), bandwidth-bound: INT8 <= 18.6, BF16 <= 9.3 TFLOP/s
    for bytes_per_weight, tflops in ((1, 18.6), (2, 9.3)):
        s = b.ExpertShape(1, 256, 8, 7168, 2048, 3 * 7168 * 2048 * bytes_per_weight)
        t = b.cpu_layer_seconds(s, 2048, 145.6, None)
        assert 2048 * s.flops_per_token_layer() / t / 1e12 == pytest.approx(tflops, rel=0.01)


def test_extrapolation_cancels_the_partial_last_layer():
    def engine_time(moe, dense=3.0, layer=0.5, last=0.1):  # the last MoE layer computes only one token
        return dense + (moe - 1) * layer + last

    assert per_layer(engine_time(5), engine_time(1), 5, 1) == pytest.approx(0.5)
    assert full_time(engine_time(5), engine_time(1), 5, 1, 58) == pytest.approx(engine_time(58))
    a = {"ttft_s": {512: engine_time(5)}, "decode_tok_s": 1 / engine_time(5)}
    bb = {"ttft_s": {512: engine_time(1)}, "decode_tok_s": 1 / engine_time(1)}
    est = estimate(a, bb, 5, 1, 58)
    assert est["ttft_s"][512] == pytest.approx(engine_time(58))
    assert est["prefill_tok_s"][512] == pytest.approx(512 / engine_time(58))
    assert est["decode_tok_s"] == pytest.approx(1 / engine_time(58))
    with pytest.raises(TandemError):
        per_layer(1.0, 1.0, 3, 3)
    with pytest.raises(TandemError):
        check_pair(SMALL, SMALL, 3, 1)  # different dense lead layers
    with pytest.raises(TandemError):
        check_pair(SMALL, b.ExpertShape(2, 8, 2, 256, 128, 1e6), 3, 3)


def test_shape_from_a_truncation():
    m = plan("deepseek-v3", 5)
    s = b.expert_shape_from_gguf(PlannedCheckpoint(m), 8)
    assert (s.moe_layers, s.experts, s.top_k, s.hidden, s.inter) == (2, 256, 8, 7168, 2048)
    assert s.formats == ("Q4_K", "Q6_K") and s.integer_weights()
