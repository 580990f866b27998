"""benchmarks/hot_kernels.py end to end at a tiny size in Triton's interpreter: the kernel families
run on the same routed experts, agree with the reference, and land in the table and the JSON."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import script_module

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "hot_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter is off with CUDA")
def test_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "hot.json"
    with script_module(BENCH, "hot_kernels_bench") as bench:
        args = f"--device cpu --dims 256,256,2,1 --layers 1 --reps 1 --tiles 8x2 --json {out}"
        assert bench.main(args.split()) == 0
    assert "hot-expert kernels" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernels"] for r in rows] == ["blocks 8 rows x 2 warps", "split rows, int8 x", "float (bf16 copies)"]
    assert all(r["us_per_layer"] > 0 and r["mb_per_layer"] > 0 for r in rows)
    # one slot's gate, up and down: 2 x 256 rows of Q4_K (144 bytes) + 256 rows of Q8_0 (272 bytes),
    # as stored and as split rows (272 is already a multiple of 16)
    assert rows[0]["mb_per_layer"] == rows[1]["mb_per_layer"] == (2 * 256 * 144 + 256 * 272) / 1e6
    # bf16 x and output: one bf16 rounding (2^-8 relative) beside fp32 order; int8 x and h: ~1%
    assert all(r["err"] < (3e-2 if r["kernels"].startswith("split") else 8e-3) for r in rows)


def test_bad_tiles_are_refused_clearly(capsys):
    with script_module(BENCH, "hot_kernels_bench") as bench:
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--device", "cpu", "--tiles", "12x2"])
    assert exit_.value.code == 2 and "rows a power of two" in capsys.readouterr().err
