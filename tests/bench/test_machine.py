"""The machine probes: small buffers, no GPU needed."""

import math

from tandem.bench import machine
from tandem.bench.bounds import ExpertShape, all_bounds


def test_read_bandwidth_probes():
    gbs, how = machine.dram_read_bandwidth(32 << 20, 2, rounds=2)
    assert math.isfinite(gbs) and gbs > 0.1 and how
    assert machine.numpy_read_bandwidth(16 << 20, 2, rounds=2) > 0.1


def test_measure_machine_without_cuda_and_its_bounds():
    lines = []
    m = machine.measure_machine(2, 32 << 20, cuda=False, log=lines.append, amx_seconds=0.01)
    assert m.dram_read_gbs > 0 and m.h2d_gbs is None and m.threads == 2 and lines
    assert m.dram_read_gbs == max(m.dram_readings.values()) and "2 threads" in m.dram_readings
    shape = ExpertShape(2, 8, 2, 256, 256, 1e6, ("Q4_K",))
    out = all_bounds(shape, m, [16, 64])
    assert set(out["prefill_cpu_bound_tok_s"]) == {16, 64} and "prefill_dual_bound_tok_s" not in out
    assert out["decode_roofline_tok_s"] == m.dram_read_gbs * 1e9 / 4e6


def test_users_are_warmed_up_before_they_are_timed(monkeypatch):
    # The batch's CUDA graph is captured on its first step: a warm-up pass must run the users too,
    # so no timed pass pays for it (the first of two timed passes read 16% slower on an H200).
    from tandem.bench import measure

    calls = []

    class Timer:
        last_split = []  # no dual-path split (the real one's after each prefill)

        def __init__(self, llm, cfg):
            pass

        def prefill(self, p):
            calls.append("prefill")
            return 1.0

        def decode(self, context, n):
            calls.append("decode")
            return 1.0

        def users(self, users, context, n):
            calls.append(("users", users))
            return 1.0

    class Cfg:
        warmup, repeats, prompts, users, context, decode_tokens, device = 1, 2, [8], 4, 16, 4, "cpu"

    monkeypatch.setattr(measure, "Timer", Timer)
    monkeypatch.setattr(measure, "_reset_peak_rss", lambda: None)
    m = measure.run(None, Cfg(), log=lambda *a: None)
    first_timed = calls.index("prefill", calls.index("decode"))
    assert ("users", 4) in calls[:first_timed] and calls.count(("users", 4)) == 3
    assert m.users_tok_s == 1.0
