"""Broken --placement rules files (found by fuzzing): a TandemError naming the file, never a raw
exception; a rule that can change nothing is named in a warning."""

import re

import pytest

from tandem.errors import TandemError
from tandem.placement.rules import PlacementOptions, build_placement, parse_json_rules, parse_text_rules

EXPERTS = [f"layers.{i}.ffn.experts" for i in (1, 2)]


@pytest.mark.parametrize(
    "regex, message",
    [
        ("(" * 5000 + ")" * 5000, "maximum recursion depth"),
        ("a{99999999999}", "the repetition number is too large"),
        ("a{4294967294,4294967295}", "the repetition number is too large"),
    ],
    ids=["deep nesting", "huge repeat", "huge repeat range"],
)
def test_regexes_that_do_not_compile(regex, message):
    with pytest.raises(TandemError, match=f"rules.txt:1: bad regex .*{message}"):
        parse_text_rules(f"{regex} = gpu\n", "rules.txt")
    with pytest.raises(TandemError, match=f"r.json: rule 1: bad regex .*{message}"):
        parse_json_rules(f'[["{regex}", "gpu"]]', "r.json")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[" + "9" * 5000 + "]"], ids=["deep", "huge int"])
def test_json_the_parser_refuses(text):
    with pytest.raises(TandemError, match="r.json: not valid JSON"):
        parse_json_rules(text, "r.json")


@pytest.mark.parametrize("name, text", [("rules.txt", "experts = gpu\n"), ("rules.json", '[["experts", "gpu"]]')])
def test_byte_order_mark(tmp_path, name, text):
    # Editors on Windows write one; it became part of the first regex, which then matched nothing.
    path = tmp_path / name
    path.write_text("\ufeff" + text, encoding="utf-8")
    placement = build_placement(PlacementOptions(device="cpu", experts="torch", rules_file=str(path)), EXPERTS)
    assert placement.rules[0].pattern == "experts"


@pytest.mark.parametrize(
    "rule",
    [
        r"model\.layers\.1\.mlp\.experts = cpu-engine",  # HF checkpoint names, not tandem's
        r"blk\.1\.ffn_up_exps = cpu-engine",  # GGUF names
        r"layers\.9\.ffn\.experts = cpu",  # a layer the model does not have
        "embed = cpu",  # not a routed expert: it runs on the --device whatever the rule says
    ],
)
def test_rules_that_match_no_routed_experts(tmp_path, rule, caplog):
    # They change nothing (only routed experts can be placed): a warning names the line, loading goes on
    # (one rules file may serve models of other depths).
    path = tmp_path / "rules.txt"
    path.write_text(f"# experts\nexperts\\.w_ = cpu-engine\n{rule}\n")
    build_placement(PlacementOptions(device="cpu", rules_file=str(path)), EXPERTS)
    assert re.search(r"rules.txt:3: '.*' matches none of this model's routed experts \(names like "
                     r"layers.1.ffn.experts.w_gate\)", caplog.text)


def test_rules_that_match_experts_are_kept(tmp_path):
    path = tmp_path / "rules.txt"
    path.write_text("layers\\.2\\. = cpu\n.* = cpu-engine\n")
    placement = build_placement(PlacementOptions(device="cpu", rules_file=str(path)), EXPERTS)
    assert [r.origin for r in placement.rules[:2]] == ["rules.txt:1", "rules.txt:2"]
    # A model without routed experts has nothing to place: the rules stand as written.
    assert build_placement(PlacementOptions(device="cpu", rules_file=str(path)), []).rules[0].pattern == "layers\\.2\\."
