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
