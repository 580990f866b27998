"""tandem bench's dual-path split per chunk (bench/dual_split.py, report.split_lines): the sums per
chunk, each side's % of its bound, and the lines the table prints. The records themselves come
from DualExperts (tests/layers/test_dual_experts.py runs real layers through mark / chunks)."""

import pytest

from tandem.bench import dual_split, report


def rec(tokens, active, dev, cpu_s, dev_s, expert=1e8, flops=1e9):
    return {"tokens": tokens, "active": active, "device_experts": dev, "device_bytes": dev * expert,
            "cpu_bytes": (active - dev) * expert, "cpu_flops": (active - dev) * flops, "cpu_s": cpu_s, "device_s": dev_s,
            "cpu_predicted_s": 0.01, "device_predicted_s": 0.01}


def test_chunks_sum_their_layers_and_each_side_only_where_timed():
    layers = [[rec(512, 10, 4, 0.006, 0.008), rec(64, 8, 0, 0.002, None)],
              [rec(512, 12, 6, 0.004, None)]]  # this layer's device share was not timed; no second chunk
    first, second = dual_split.by_chunk(layers)
    assert (first["tokens"], first["layers"], first["active"], first["device_experts"]) == (512, 2, 22, 10)
    assert first["cpu_bytes"] == 12e8 and first["device_bytes"] == 10e8
    assert first["cpu_s"] == pytest.approx(0.010) and first["cpu_timed_bytes"] == 12e8
    assert first["device_s"] == pytest.approx(0.008) and first["device_timed_layers"] == 1
    assert first["device_timed_bytes"] == 4e8  # the bytes of the layer that timed it, not both
    assert (second["layers"], second["device_s"], second["device_timed_layers"]) == (1, None, 0)
    assert (first["runs"], first["overlapped_runs"]) == (0, 0)  # records without run counts
    runs = dual_split.by_chunk([[dict(rec(512, 10, 4, 0.006, 0.008), runs=3, overlapped_runs=2)],
                                [dict(rec(512, 10, 4, 0.006, 0.008), runs=1, overlapped_runs=0)]])[0]
    assert (runs["runs"], runs["overlapped_runs"]) == (4, 2)
    line = report.split_lines({"512": [runs]})[0]
    assert "GPU took 40% of the active experts in 4 runs, 2 of them copied while the run before computed;" in line
    assert dual_split.by_chunk([[], []]) == []


def test_each_side_against_its_bound():
    c = dual_split.by_chunk([[rec(512, 10, 5, 0.010, 0.020)]])[0]
    # CPU: 5e8 bytes in 10 ms = 50 GB/s; bound max(5e8 / 100 GB/s, 5e9 FLOP / 1e12) = 5 ms -> 50%
    got = dual_split.with_bounds(c, 100.0, 50.0, 1e12)
    assert got["cpu_gbs"] == pytest.approx(50.0) and got["cpu_pct_of_bound"] == pytest.approx(50.0)
    # GPU: 5e8 bytes in 20 ms = 25 GB/s against 50 GB/s -> 50%
    assert got["device_gbs"] == pytest.approx(25.0) and got["device_pct_of_bound"] == pytest.approx(50.0)
    # the FLOPs bound when it is the longer: 5e9 FLOP at 1e11 FLOP/s = 50 ms (a side beating its bound reads over 100%)
    assert dual_split.with_bounds(c, 100.0, 50.0, 1e11)["cpu_pct_of_bound"] == pytest.approx(500.0)
    bare = dual_split.with_bounds(c, None, None, None)  # a machine without the both-at-once probe
    assert "cpu_pct_of_bound" not in bare and "device_pct_of_bound" not in bare


def test_the_table_prints_each_chunk_of_each_prompt():
    c = dual_split.with_bounds(dual_split.by_chunk([[rec(512, 10, 5, 0.010, None)]])[0], 100.0, 50.0, 1e12)
    lines = report.split_lines({"512": [c, c]})
    assert lines[1] == ("prefill 512 split, chunk 2/2 (512 tokens, 1 layers): GPU took 50% of the active experts; "
                        "CPU 10.0 ms at 50.0 GB/s = 50% of its bound; GPU -")
    section = {"title": "m (measured)", "config": {"device": "cuda", "context": 8},
               "shape": {"moe_layers": 1, "top_k": 2, "experts": 4, "bytes_per_token": 1e9, "formats": ["Q4_K"]},
               "bounds": {"compute_peak": "AMX INT8", "prefill_cpu_bound_tok_s": {"512": 100.0},
                          "decode_roofline_tok_s": 10.0, "users": 16, "users_bound_tok_s": 20.0},
               "measured": {"prefill_tok_s": {"512": 50.0}, "ttft_s": {"512": 10.24}, "decode_tok_s": 5.0,
                            "prefill_split": {"512": [c]}}}
    text = report.table({"machine": {"cpu": "x", "threads": 2, "dram_read_gbs": 100.0, "dram_probe": "p"},
                         "models": [section]})
    assert "  prefill 512 split, chunk 1/1 (512 tokens" in text
