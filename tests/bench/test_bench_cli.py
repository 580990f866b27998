"""`tandem bench` end to end on tiny synthetic models: table, JSON, PNG, profile, extrapolation."""

import importlib.util
import json

import pytest

from tandem.cli.main import main
from tandem.testing.synth import write_synth

# --device cpu: on a GPU box the default would add the H2D and both-at-once probes (another DRAM reading)
FAST = ["--prompts", "8,16", "--context", "8", "--decode-tokens", "3", "--repeats", "1", "--warmup", "0",
        "--bw-gb", "0.02", "--threads", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def quick_probes(monkeypatch):
    """The AMX probe takes seconds on a loaded 2-core box; the bound arithmetic has its own tests."""
    monkeypatch.setattr("tandem.bench.machine.amx_peaks", lambda threads, seconds=0.2: (None, None))


@pytest.fixture(scope="module")
def truncations(tmp_path_factory):
    """Debug-scale DeepSeek-V2-Lite with 1 dense + 2 and 1 dense + 1 MoE layers."""
    root = tmp_path_factory.mktemp("bench")
    return [write_synth(root / f"v2l-{n}.gguf", "deepseek-v2-lite", n, scale=16, progress=False).path for n in (3, 2)]


def test_bench_writes_json_plot_and_profile(truncations, tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    assert main(["bench", str(truncations[1]), *FAST, "--json", str(out), "--profile", *plot]) == 0
    table = capsys.readouterr().out
    assert "prefill 16 tok/s" in table and "decode tok/s (ctx 8)" in table and "reproduce: tandem bench" in table
    r = json.loads(out.read_text())
    s = r["models"][0]
    assert r["machine"]["dram_read_gbs"] > 0
    assert set(s["measured"]["prefill_tok_s"]) == {"8", "16"} and s["measured"]["decode_tok_s"] > 0
    assert s["measured"]["peak_rss_gb"] > 0
    assert s["bounds"]["decode_roofline_tok_s"] > 0 and s["shape"]["moe_layers"] == 1
    prof = s["profile"]["prefill_8"]["ms_per_step"]
    assert prof["attention"] > 0 and prof["experts wait"] + prof["experts submit"] > 0
    assert [row["kind"] for row in s["profile"]["decode_after_8"]["layers"]] == ["dense", "moe"]
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_extrapolates_two_truncations(truncations, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["bench", "--extrapolate", *map(str, truncations), *FAST, "--json", str(out)]) == 0
    assert "ESTIMATE from 2 vs 1 MoE layers extrapolated to 26" in capsys.readouterr().out
    est = json.loads(out.read_text())["estimate"]
    assert est["estimate"] and est["shape"]["moe_layers"] == 26
    m = est["measured"]  # tiny layers: noise may exceed a layer's time, then the figure is None
    assert set(m["prefill_tok_s"]) == {"8", "16"} and set(m["per_moe_layer_s"]) == {"prefill_8", "prefill_16", "decode_token"}
    assert all(v is None or v > 0 for v in [m["decode_tok_s"], *m["prefill_tok_s"].values()])


def test_bench_user_errors(truncations, capsys):
    assert main(["bench"]) == 2
    assert main(["bench", str(truncations[0]), "--prompts", "a,b"]) == 2
    assert main(["bench", "--extrapolate", str(truncations[0]), str(truncations[0]), *FAST]) == 2
    assert capsys.readouterr().err.count("error:") == 3
    # A full depth not beyond the deeper truncation fails before measuring (it failed after, with an
    # internal message about a negative layer count).
    assert main(["bench", "--extrapolate", *map(str, truncations), "--full-layers", "1", *FAST]) == 2
    assert "--full-layers 1 is not deeper than the deeper truncation" in capsys.readouterr().err


def test_bench_with_hot_experts(truncations, tmp_path, capsys):
    out = tmp_path / "hot.json"
    assert main(["bench", str(truncations[1]), *FAST, "--gpu-experts", "4", "--json", str(out)]) == 0
    capsys.readouterr()
    r = json.loads(out.read_text())
    assert r["models"][0]["config"]["gpu_experts"] == 4 and r["models"][0]["measured"]["decode_tok_s"] > 0


def test_the_reproduce_line_parses_back_to_the_same_options():
    """Every option that differs from its default, switches as their own flags (--no-look-ahead,
    not '--look-ahead False'): parsed again, the line gives the same options."""
    import shlex

    from tandem.cli.bench import _bench_parser, _command

    argv = ["m.gguf", "--threads", "14", "--prompts", "512,2048", "--no-look-ahead", "--no-cuda-graph",
            "--no-dual-prefill", "--users", "16"]
    args = _bench_parser().parse_args(argv)
    line = _command(args)
    assert line.startswith("tandem bench m.gguf ") and "False" not in line
    assert vars(_bench_parser().parse_args(shlex.split(line)[2:])) == vars(args)


def test_bounds_take_the_best_reading_of_the_run(truncations, tmp_path, monkeypatch, capsys):
    """A probe reading after the engines that beats the first ones becomes the bounds' bandwidth
    (one reading can come out low on a shared machine); every reading stays in the JSON."""
    readings = iter([10.0, 40.0])
    monkeypatch.setattr("tandem.bench.machine.dram_read_bandwidth", lambda nbytes, threads, rounds=3: (next(readings), "fake"))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # 2 cores, 2 threads: one reading up front
    out = tmp_path / "r.json"
    assert main(["bench", str(truncations[1]), *FAST, "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "after the engines: 40.0 GB/s" in printed.err  # the log line
    assert "DRAM read 40.0 GB/s (fake; best of 2 threads 10.0, after the engines 40.0)" in printed.out  # the table
    r = json.loads(out.read_text())
    assert r["machine"]["dram_readings"] == {"2 threads": 10.0, "after the engines": 40.0}
    assert r["machine"]["dram_read_gbs"] == 40.0
    s = r["models"][0]
    assert s["bounds"]["decode_roofline_tok_s"] == pytest.approx(40e9 / s["shape"]["bytes_per_token"])
