"""benchmarks/moe_cpu.py end to end at a tiny size (one small layer copy, T = 1 and 8): it measures the
machine, times rows and writes valid JSON; and its random rows load as prequantized layers."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from benchmarks import moe_layers
from tandem.ops import cpu
from tests.conftest import script_module
from tests.ops.moe_cases import (
    dense_weights,
    dequant_ref,
    reference,
    rel_err,
    routing,
    tokens,
)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_cpu.py"


@pytest.fixture(scope="module")
def bench():
    with script_module(BENCH, "moe_cpu_bench") as mod:
        yield mod


def test_benchmark_runs_and_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = "--shapes qwen3 --formats q4_k_m,int8 --tokens 1,8 --copies 1 --max-gb 0.05 --experts 8 "
    args += f"--bw-gb 0.1 --repeats 2 --warmup 1 --threads 2 --json {out}"
    assert bench.main(args.split()) == 0
    printed = capsys.readouterr().out
    assert "DRAM read bandwidth" in printed and "Qwen3-30B-A3B" in printed  # the table comes last
    result = json.loads(out.read_text())
    assert result["machine"]["bandwidth_gbs"]["2"] > 0
    timed = [r for r in result["rows"] if r["engine"] == "tandem"]
    assert {(r["format"], r["tokens"]) for r in timed} == {("q4_k_m", 1), ("q4_k_m", 8), ("int8", 1), ("int8", 8)}
    for r in timed:
        assert r["types"] == ("Q4_K/Q4_K/Q6_K" if r["format"] == "q4_k_m" else "INT8/INT8/INT8")
        for key in ("ms", "gbs", "pct_bw", "tflops", "pct_bound"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert set(r["phases"]) == {"prep_x", "gate_up", "prep_h", "down", "done"} == set(r["phase_waits"])
        assert all(0 <= v <= r["phases"]["done"] for v in r["phase_waits"].values()), r
        # the calling thread joins the engine's 2 threads unless TANDEM_JOIN=0: 3 workers
        assert r["threads"] == 2 and r["workers"] == (2 if os.environ.get("TANDEM_JOIN") == "0" else 3), r
    assert len(result["table"]) == 4
    assert (" 2+1 " if os.environ.get("TANDEM_JOIN") != "0" else " 2 ") in printed.split("path")[-1]
    # kt-kernel either ran or says why not, never silently absent
    kt = [r for r in result["rows"] if r["engine"] == "kt-kernel"]
    assert kt and all("skipped" in r or "ms" in r for r in kt)


def test_benchmark_rejects_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "v9"])
    with pytest.raises(SystemExit):
        bench.main(["--formats", "q3_k"])
    with pytest.raises(SystemExit):
        bench.main(["--experts", "4", "--shapes", "v3"])  # below top-8


def test_down_type_of_q4_k_m_follows_llama_cpp():
    """I = 1408 is no multiple of 256: V2-Lite's down falls back to a 32-block type."""
    assert moe_layers.fmt_types("q4_k_m", moe_layers.SHAPES["v2-lite"]) == ("Q4_K", "Q4_K", "Q8_0")
    assert moe_layers.fmt_types("q4_k_m", moe_layers.SHAPES["v3"]) == ("Q4_K", "Q4_K", "Q6_K")


@pytest.mark.parametrize("fmt", ["BF16", "INT8", "INT4"])
def test_prequantized_rows_equal_quantizing_at_load(fmt):
    """Rows already in the format's row layout (as the benchmark writes them) load like floats that
    the engine quantizes itself."""
    E, I, H = 3, 64, 128
    dense = dense_weights(E, I, H, seed=4)
    held = tuple(dequant_ref(fmt, t) for t in dense)
    rows = [_row_layout(fmt, t) for t in dense]
    eng = cpu.create_engine(n_threads=2, isa="generic")
    from_floats = cpu.add_layer(eng, fmt, *dense)
    from_rows = cpu.add_layer(eng, fmt, *rows, prequantized=True)
    x = tokens(5, H)
    ids, w = routing(5, E, 2)
    a = cpu.wait(eng, cpu.submit(eng, from_floats, x, ids, w))
    b = cpu.wait(eng, cpu.submit(eng, from_rows, x, ids, w))
    assert torch.equal(a, b)
    assert rel_err(b, reference(x, ids, w, *held)) < 2e-5
    # the benchmark's random rows have the right length for their format
    assert moe_layers.random_weight(fmt, E, I, H, seed=0).shape == rows[0].shape
    with pytest.raises(TypeError, match="prequantized rows as uint8"):
        cpu.add_layer(eng, fmt, *dense, prequantized=True)
    with pytest.raises(ValueError, match="is not|must be"):  # INT8 rows of any K: a shape mismatch
        cpu.add_layer(eng, fmt, rows[0][..., :-1].contiguous(), rows[1], rows[2], prequantized=True)


def _row_layout(fmt: str, w: torch.Tensor) -> torch.Tensor:
    """uint8 [E, rows, row_bytes] of w quantized as csrc/quant does (via the numpy mirrors)."""
    q = dequant_ref(fmt, w)
    if fmt == "BF16":
        return w.to(torch.bfloat16).view(torch.uint8).reshape(*w.shape[:-1], -1).contiguous()
    if fmt == "INT8":
        scale = w.abs().amax(-1, keepdim=True) / 127.0
        codes = torch.where(scale == 0, 0, torch.round(q / scale)).to(torch.int8)
        return torch.cat([scale.view(torch.uint8), codes.view(torch.uint8)], dim=-1).contiguous()
    groups = w.reshape(*w.shape[:-1], -1, 64)
    d = groups.abs().amax(-1, keepdim=True) / 7.0
    nib = (torch.where(d == 0, 0, torch.round(q.reshape(groups.shape) / d)) + 8).to(torch.uint8)
    packed = nib[..., :32] | (nib[..., 32:] << 4)
    blocks = torch.cat([d.view(torch.uint8), packed], dim=-1)
    return blocks.reshape(*w.shape[:-1], -1).contiguous()


def test_a_dying_kt_kernel_process_costs_only_its_rows(bench, monkeypatch):
    # kt-kernel runs in a child process: its rows come back as it measures them, and a crash (the
    # H200 box saw a heap error right after its BF16 row) becomes a skipped row, not a dead benchmark.
    import subprocess

    row = {"engine": "kt-kernel", "shape": "Qwen3-30B-A3B", "format": "bf16", "tokens": 1, "threads": 2, "ms": 1.5}
    seen = {}

    def died(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, -6, stdout=bench.KT_ROW + json.dumps(row) + "\nnoise\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", died)
    rows = []
    bench.bench_kt_isolated("qwen3", "bf16", bench.kt_argv(["--tokens", "1,8", "--json", "x.json"]), 2, rows)
    assert rows[0] == row
    assert rows[1]["skipped"] == "kt-kernel's process ended with exit code -6 after 1 rows"
    assert "--json" not in seen["cmd"] and seen["cmd"][-2:] == ["--kt-child", "qwen3,bf16,2"]
