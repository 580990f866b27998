"""`tandem chat` and `tandem inspect` on the GQA families (Qwen2-MoE, Qwen3-MoE, Mixtral), in-process."""

import io
import math
import sys

import pytest
from safetensors import safe_open

from tandem.cli.main import main
from tandem.testing.tiny import write_tiny

# One variant per family: architecture, layer line, routed experts, top-k, shared experts.
FAMILIES = {
    "qwen2_moe": ("Qwen2MoeForCausalLM", "2 (0 dense, 2 MoE)", 8, 4, 1),
    "qwen3_moe_odd": ("Qwen3MoeForCausalLM", "3 (1 dense, 2 MoE)", 6, 3, 0),
    "mixtral_window": ("MixtralForCausalLM", "2 (0 dense, 2 MoE)", 8, 2, 0),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, tmp_path_factory):
    return request.param, write_tiny(tmp_path_factory.mktemp(request.param), request.param, seed=4)


def test_chat_runs_and_keeps_history(model, monkeypatch, capsys):
    _, path = model
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhi again\n/exit\n"))
    assert main(["chat", str(path), "--max-new-tokens", "3", "--temperature", "0", "--max-context", "256"]) == 0
    captured = capsys.readouterr()
    stats = [line for line in captured.out.splitlines() if line.startswith("[prefill")]
    assert len(stats) == 2 and "Traceback" not in captured.err
    sizes = [int(line.split()[1]) for line in stats]
    assert sizes[1] > sizes[0]  # the second turn's prompt holds the first exchange


def test_inspect_reports_layers_experts_and_parameters(model, capsys):
    name, path = model
    arch, layers, experts, top_k, shared = FAMILIES[name]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    with safe_open(path / "model.safetensors", "pt") as f:
        sizes = {n: math.prod(f.get_slice(n).get_shape()) for n in f.keys()}
    total = sum(sizes.values())
    routed = sum(n for tensor, n in sizes.items() if ".experts." in tensor)
    active = total - routed + routed * top_k // experts
    assert arch in out and layers in out and f"{experts} (top-{top_k}), shared {shared}" in out
    assert f"{total:,} total, {active:,} active per token" in out
