"""Placement rules: presets, first match wins, rules files (text and JSON) with line-numbered errors."""

import pytest

from tandem.errors import TandemError
from tandem.placement.rules import (
    Placement,
    PlacementOptions,
    Rule,
    Target,
    build_placement,
    parse_json_rules,
    parse_text_rules,
    read_rules_file,
)

EXPERTS = [f"layers.{i}.ffn.experts" for i in (1, 2, 3, 4)]  # MoE layers 1-4 (layer 0 dense)
ENGINE, GPU, CPU = Target("cpu", "engine"), Target("cuda", "torch"), Target("cpu", "torch")


def where(placement: Placement, name: str) -> Target:
    return placement.resolve(name, ".experts." in name)


def test_cpu_moe_is_the_default_hybrid():
    p = build_placement(PlacementOptions(device="cuda"), EXPERTS)
    assert where(p, "layers.2.ffn.experts.w_gate") == ENGINE
    for name in ("embed.weight", "layers.2.attn.q_a_proj.weight", "layers.2.ffn.shared.up_proj.weight",
                 "layers.2.ffn.router.weight", "layers.0.ffn.gate_proj.weight", "lm_head.weight"):
        assert where(p, name) == GPU
    assert p == build_placement(PlacementOptions(device="cuda", cpu_moe=True), EXPERTS)


def test_device_cpu_puts_all_on_the_cpu():
    p = build_placement(PlacementOptions(device="cpu"), EXPERTS)
    assert where(p, "layers.1.ffn.experts.w_down") == ENGINE
    assert where(p, "embed.weight") == CPU
    torch_experts = build_placement(PlacementOptions(device="cpu", experts="torch"), EXPERTS)
    assert where(torch_experts, "layers.1.ffn.experts.w_down") == CPU


def test_n_cpu_moe_layers_counts_moe_layers():
    p = build_placement(PlacementOptions(device="cuda", n_cpu_moe_layers=2), EXPERTS)
    assert [where(p, f"{m}.w_up") for m in EXPERTS] == [ENGINE, ENGINE, GPU, GPU]
    none = build_placement(PlacementOptions(device="cuda", n_cpu_moe_layers=0), EXPERTS)
    assert {where(none, f"{m}.w_up") for m in EXPERTS} == {GPU}
    every = build_placement(PlacementOptions(device="cuda", n_cpu_moe_layers=9), EXPERTS)
    assert {where(every, f"{m}.w_up") for m in EXPERTS} == {ENGINE}


def test_rules_file_comes_first_and_first_match_wins(tmp_path):
    path = tmp_path / "rules.txt"
    path.write_text("# layer 4 stays on the GPU\nlayers\\.4\\.ffn\\.experts = gpu\nexperts = cpu-engine\n")
    p = build_placement(PlacementOptions(device="cuda", n_cpu_moe_layers=0, rules_file=str(path)), EXPERTS)
    assert [where(p, f"{m}.w_gate") for m in EXPERTS] == [ENGINE, ENGINE, ENGINE, GPU]
    assert p.rule_for("layers.4.ffn.experts.w_gate").origin == "rules.txt:2"


def test_json_rules_file(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text('[{"match": "layers\\\\.1\\\\.", "target": "gpu"}, ["experts", "cpu-engine"]]')
    p = build_placement(PlacementOptions(device="cuda", rules_file=str(path)), EXPERTS)
    assert where(p, "layers.1.ffn.experts.w_gate") == GPU
    assert where(p, "layers.2.ffn.experts.w_gate") == ENGINE


@pytest.mark.parametrize(
    "text, message",
    [
        ("experts = cpu-engine\nexperts = tpu\n", r"rules.txt:2: unknown placement target 'tpu'"),
        ("\n\nlayers.(3 = gpu\n", r"rules.txt:3: bad regex 'layers.\(3'"),
        ("experts cpu-engine\n", r"rules.txt:1: expected 'REGEX = TARGET'"),
        ("# nothing\n", r"rules.txt: no placement rules"),
    ],
)
def test_text_rules_errors_name_the_line(text, message):
    with pytest.raises(TandemError, match=message):
        parse_text_rules(text, "rules.txt")


@pytest.mark.parametrize(
    "text, message",
    [
        ('[["a", "gpu"],\n {"pattern": "b"}]', r"r.json: rule 2: expected"),
        ('[["a", "gpu"]\n ["b", "cpu"]]', r"r.json:2: not valid JSON"),
        ('{"rules": []}', r"r.json: expected a non-empty JSON list"),
        ('[[1, "gpu"]]', r"r.json: rule 1: match and target must be strings"),
    ],
)
def test_json_rules_errors(text, message):
    with pytest.raises(TandemError, match=message):
        parse_json_rules(text, "r.json")


def test_missing_rules_file(tmp_path):
    with pytest.raises(TandemError, match="cannot read placement file"):
        read_rules_file(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "rules, device, name, message",
    [
        ([Rule("embed", "cpu-engine", "f:1")], "cuda", "embed.weight", "f:1: .* the CPU engine only runs routed experts"),
        ([Rule(".*", "gpu", "f:1")], "cpu", "embed.weight", "--device is cpu; pass --device cuda"),
        ([Rule("embed", "cpu", "f:1")], "cuda", "embed.weight", "non-expert weights run on the --device"),
        ([Rule("experts", "cpu", "f:1")], "cuda", "layers.1.ffn.experts.w_up", "routed experts go to cpu-engine or gpu"),
        ([Rule("embed", "gpu")], "cuda", "lm_head.weight", "no placement rule matches"),
    ],
)
def test_impossible_targets_are_refused(rules, device, name, message):
    with pytest.raises(TandemError, match=message):
        where(Placement(tuple(rules), device), name)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(n_cpu_moe_layers=-1), "must be >= 0"),
        (dict(n_cpu_moe_layers=2, cpu_moe=True), "give one of them"),
        (dict(n_cpu_moe_layers=2, experts="torch"), "give one of them"),
        (dict(cpu_moe=True, experts="torch"), "give one of them"),
        (dict(experts="gpu-magic"), "unknown experts backend"),
        (dict(device="tpu"), "--device 'tpu' is not supported"),
    ],
)
def test_conflicting_flags(options, message):
    with pytest.raises(TandemError, match=message):
        PlacementOptions(**options)
