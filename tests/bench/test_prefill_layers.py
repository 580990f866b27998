"""benchmarks/prefill_layers.py: its per-layer table of a long step's stamps (host, engine, device
share), on stamps laid out by hand; the measurement itself needs CUDA (it ran on the GPU
machine as .dev/serial.py, docs/benchmarks.md section 5)."""

import math
from pathlib import Path

import pytest

from tests.conftest import script_module

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "prefill_layers.py"
MS = 1_000_000  # ns


def stamp(layer, enter, sync, exit_, w_exit, launch, done, device_s, ndev=3, runs=1):
    return {"layer": layer, "enter": enter * MS, "sync": sync * MS if sync is not None else None, "exit": exit_ * MS,
            "w_exit": w_exit * MS, "launch": launch * MS if launch is not None else None,
            "done": done * MS if done is not None else None, "device_s": device_s, "ndev": ndev, "runs": runs}


def test_rows_and_means_of_a_steps_layers():
    with script_module(BENCH, "prefill_layers_bench") as bench:
        t = bench.layer_table([
            stamp(1, 100, 101, 103, 104, 102, 106, 0.004),
            stamp(2, 108, 108.5, 110, 111, None, None, 0.005, ndev=64, runs=4),  # every slot on the device
            stamp(3, 112, 113, 116, 117, 114, 119, None),  # the device share not timed
        ])
    one, two, three = t["rows"]
    assert (one["enter"], one["sync"], one["done"]) == (0, 1, 6)  # ms from the first layer's submit
    assert one["engine"] == 4 and one["device"] == pytest.approx(4) and one["split"] == 1 and one["submit"] == 2
    assert math.isnan(one["gap"])  # no layer before it
    assert math.isnan(two["engine"]) and math.isnan(two["split"]) and (two["ndev"], two["runs"]) == (64, 4)
    assert two["gap"] == pytest.approx(2.5)  # layer 1's engine end (106) -> this count (108.5)
    assert math.isnan(three["gap"])  # the layer before had no engine job
    assert math.isnan(three["device"]) and three["engine"] == 5
    m = t["means"]
    assert m["engine"] == {"ms": 4.5, "layers": 2}
    assert m["device"]["ms"] == pytest.approx(4.5) and m["device"]["layers"] == 2
    assert m["gap"] == {"ms": 2.5, "layers": 1}
    assert m["submit"]["ms"] == pytest.approx((2 + 1.5 + 3) / 3)


def test_no_layers_and_bad_counts_are_refused_before_anything_loads():
    with script_module(BENCH, "prefill_layers_bench") as bench:
        with pytest.raises(ValueError, match="nothing to tabulate"):
            bench.layer_table([])
        for bad in (["--tokens", "0"], ["--prompts", "0"]):
            with pytest.raises(SystemExit, match="must be >= 1"):
                bench.main(["model.gguf", *bad])
