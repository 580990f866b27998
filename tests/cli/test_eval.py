"""`tandem eval`: perplexity and the quality table on the shipped demo model."""

import json

from tandem.cli.main import main


def test_eval_ppl_on_the_demo_model(capsys):
    assert main(["eval", "ppl", "--max-tokens", "1024", "--window", "256"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split()[1])
    assert 1 < ppl < 0.05 * 4096 and "1023 tokens" in out


def test_eval_compare_q8_0_is_within_1_percent_of_baseline(tmp_path, capsys):
    report = tmp_path / "q.json"
    assert main(["eval", "compare", "--max-tokens", "1024", "--window", "256", "--json", str(report)]) == 0
    rows = {r["variant"]: r for r in json.loads(report.read_text())["rows"]}
    assert list(rows)[0] == "fp32 (baseline)" and len(rows) == 9
    assert abs(rows["GGUF Q8_0"]["vs_baseline_pct"]) < 1.0
    assert abs(rows["bf16"]["vs_baseline_pct"]) < 1.0
    # Fewer experts must change the model (a silently ignored override would read +0.00%).
    assert rows["top-2 experts (of 4)"]["ppl"] > rows["fp32 (baseline)"]["ppl"] * 1.01
    assert "GGUF Q4_K_M" in capsys.readouterr().out


def test_eval_needs_a_text_when_the_model_ships_none(tmp_path, capsys):
    from tandem.testing.tiny import write_tiny

    path = write_tiny(tmp_path, "deepseek_v2_lite")
    assert main(["eval", "ppl", str(path)]) == 2
    assert "--text" in capsys.readouterr().err
