"""benchmarks/hot_experts_curve.py end to end on a tiny GGUF on the CPU: every budget runs, the hot
share s follows the budget (none hot: 0, all hot: 1), the rows land in the JSON and the plot."""

import json
from pathlib import Path

import pytest

from tandem.testing.tiny_gguf import write_tiny_gguf
from tests.conftest import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hot_experts_curve.py"


@pytest.fixture(scope="module")
def curve():
    with script_module(SCRIPT, "hot_experts_curve") as mod:
        yield mod


def test_curve_on_the_cpu(curve, tmp_path, capsys):
    _, gguf = write_tiny_gguf(tmp_path, "deepseek_v3_q", "Q8_0", seed=51)
    out, png = tmp_path / "hot.json", tmp_path / "hot.png"
    argv = [str(gguf), "--device", "cpu", "--threads", "1", "--fractions", "0.5,1", "--context", "24",
            "--decode-tokens", "6", "--repeats", "1", "--json", str(out), "--plot", str(png)]
    assert curve.main(argv) == 0
    assert "hot/layer" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    experts = rows[0]["experts"]
    assert [r["fraction"] for r in rows] == [0.0, 0.5, 1.0]  # 0 always runs first
    assert [r["hot_per_layer"] for r in rows] == [0, round(experts / 2), experts]
    assert rows[0]["s"] == 0.0 and rows[2]["s"] == 1.0 and 0.0 < rows[1]["s"] < 1.0
    assert all(r["tok_s"] > 0 for r in rows)
    assert "model_ms" not in rows[0]  # the CPU has no stream split: the curve alone
    assert png.stat().st_size > 0
    # A GPU machine's JSON, replotted where matplotlib is installed.
    again = tmp_path / "again.png"
    assert curve.main(["--from-json", str(out), "--plot", str(again)]) == 0
    assert "hot/layer" in capsys.readouterr().out and again.stat().st_size > 0


def test_bad_fractions_are_refused(curve, capsys):
    with pytest.raises(SystemExit):
        curve.main(["m.gguf", "--fractions", "0,2"])
    assert "fractions must be in 0..1" in capsys.readouterr().err


def test_a_split_with_negative_gpu_time_holds_nothing(curve):
    """Session 9's GPU run: the split's CPU part (682 ms) exceeded the step (15 ms), so every model
    time was negative and every ratio negative, which read as 'within'."""
    base = {"t_cpu_ms": 682.5, "t_gpu_ms": -622.0}
    row = {"s": 0.29, "ms_per_token": 26.1}
    curve.hold_to_model(row, base)
    assert row["within"] is False and "ratio" not in row and "stream split is wrong" in row["split_error"]
    good = {"s": 0.5, "ms_per_token": 9.0}
    curve.hold_to_model(good, {"t_cpu_ms": 10.0, "t_gpu_ms": 4.0})
    assert good["model_ms"] == 9.0 and good["ratio"] == 1.0 and good["within"] is True
    slow = {"s": 0.5, "ms_per_token": 10.0}
    curve.hold_to_model(slow, {"t_cpu_ms": 10.0, "t_gpu_ms": 4.0})
    assert slow["within"] is False  # 10 / 9 > 1.1


def test_a_budget_is_also_held_with_its_own_gpu_time(curve):
    """All hot: the engine is never called, the step is the GPU's; against the no-hot t_GPU the
    hot experts' GPU time counts (ratio 1.5), against its own it does not (ratio 1). Half hot with
    a CPU part that did not shrink with s fails the own model too."""
    base = {"t_cpu_ms": 10.0, "t_gpu_ms": 4.0}
    all_hot = {"s": 1.0, "ms_per_token": 6.0, "t_cpu_ms": 0.0, "t_gpu_ms": 6.0}
    curve.hold_to_model(all_hot, base)
    assert all_hot["ratio"] == 1.5 and all_hot["within"] is False
    assert all_hot["model_own_ms"] == 6.0 and all_hot["ratio_own"] == 1.0 and all_hot["within_own"] is True
    stuck = {"s": 0.5, "ms_per_token": 14.0, "t_cpu_ms": 10.0, "t_gpu_ms": 4.0}  # CPU time as with none hot
    curve.hold_to_model(stuck, base)
    assert stuck["model_own_ms"] == 9.0 and stuck["within_own"] is False
    no_split = {"s": 0.5, "ms_per_token": 9.0}  # no split of its own (not on a GPU): the base model only
    curve.hold_to_model(no_split, base)
    assert "ratio" in no_split and "ratio_own" not in no_split
