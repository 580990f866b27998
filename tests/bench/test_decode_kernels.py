"""benchmarks/decode_kernels.py: its summary of profiled decode steps (per kernel name, and the
middle step's timeline with the gap before each kernel), on kernels laid out by hand; the
measurement itself needs CUDA (it ran on the GPU machine, docs/benchmarks.md section 5)."""

from pathlib import Path

import pytest
import torch

from tests.conftest import script_module

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_kernels.py"


def steps_of(bench, n: int):
    """n steps 1000 us apart: norm (2 us), gemv (10 us) after a 1 us gap, a 300 us wait, gemv (6 us);
    step i's gemvs take i us longer."""
    out = []
    for i in range(n):
        t = 1000.0 * i
        out += [bench.Kernel(t, t + 2, "norm"), bench.Kernel(t + 3, t + 13 + i, "gemv"),
                bench.Kernel(t + 313 + i, t + 319 + 2 * i, "gemv")]
    return out[::-1]  # any order in: the summary sorts by start


def test_summary_rows_and_the_middle_steps_timeline():
    with script_module(BENCH, "decode_kernels_bench") as bench:
        r = bench.summarize(steps_of(bench, 3), 3)
    assert r["kernels_per_step"] == 3
    gemv, norm = r["rows"]  # most time first
    assert gemv["name"] == "gemv" and gemv["per_step"] == 2
    assert gemv["mean_us"] == pytest.approx((10 + 6 + 11 + 7 + 12 + 8) / 6)
    assert norm == {"name": "norm", "per_step": 1, "mean_us": 2, "ms_per_step": pytest.approx(2e-3)}
    assert r["device_ms_per_step"] == pytest.approx((2 + 10 + 6 + 2 + 11 + 7 + 2 + 12 + 8) / 3 / 1e3)
    # the middle step (the second): gaps before each kernel, durations, names in start order
    assert r["timeline"] == [(0, 2, "norm"), (1, 11, "gemv"), (300, 7, "gemv")]
    assert r["middle_span_ms"] == pytest.approx(0.321)


def test_summary_refuses_steps_that_differ():
    with script_module(BENCH, "decode_kernels_bench") as bench:
        kernels = steps_of(bench, 3)
        with pytest.raises(ValueError, match="do not split into 3 equal steps"):
            bench.summarize(kernels[1:], 3)
        with pytest.raises(ValueError, match="nothing to summarize"):
            bench.summarize([], 3)


def test_busy_time_counts_overlapping_kernels_once():
    with script_module(BENCH, "decode_kernels_bench") as bench:
        k = bench.Kernel
        # 0-10 and 5-12 overlap (12 us), 20-25 apart (5 us), 21-23 inside it
        assert bench.busy_ms([k(20, 25, "c"), k(0, 10, "a"), k(21, 23, "d"), k(5, 12, "b")]) == pytest.approx(17e-3)
        assert bench.busy_ms([]) == 0


def test_bad_counts_are_refused_before_anything_loads():
    with script_module(BENCH, "decode_kernels_bench") as bench:
        for bad in (["--prefill", "-1"], ["--steps", "0"], ["--warmup", "-2"]):
            with pytest.raises(SystemExit, match="must be >= 1"):
                bench.main(["model.gguf", *bad])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_needs_a_gpu():
    with script_module(BENCH, "decode_kernels_bench") as bench, pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["model.gguf"])
