"""The plan applied at load (CPU-only machines): layers bound per the rules, refusal before loading,
and the CLI flags."""

import pytest
import torch

import tandem.runtime.llm as llm_module
from tandem.cli.main import main as run
from tandem.errors import TandemError
from tandem.layers.block_experts import BlockExperts
from tandem.layers.cpu_experts import CpuExperts
from tandem.layers.moe import TorchExperts
from tandem.placement.advice import DoesNotFit
from tandem.runtime.llm import LLM
from tandem.testing.tiny import write_tiny
from tandem.testing.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf"), "deepseek_v3_q", "Q4_K_M", seed=3)[1]


def backends(llm: LLM) -> list[type]:
    return [type(m.experts) for m in llm.model.modules() if hasattr(m, "experts")]


def test_n_cpu_moe_layers_binds_per_layer(gguf):
    all_engine = LLM(gguf, dtype="float32", progress=False, max_batch=1)
    first = LLM(gguf, dtype="float32", progress=False, max_batch=1, n_cpu_moe_layers=1)
    assert backends(all_engine) == [CpuExperts, CpuExperts]
    # With --device cpu the rest use torch on the CPU: the file's blocks, dequantized per call.
    assert backends(first) == [CpuExperts, BlockExperts]
    prompt = all_engine.tokenizer.encode("def f(x):")
    want = all_engine.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert first.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids == want
    assert first.plan.ram == all_engine.plan.ram


def test_float_checkpoint_with_a_rules_file(tmp_path):
    path = write_tiny(tmp_path / "m", "deepseek_v3", seed=2)  # MoE layers 1 and 2
    rules = tmp_path / "rules.txt"
    rules.write_text("layers\\.2\\.ffn\\.experts = cpu\nexperts = cpu-engine\n")
    llm = LLM(path, progress=False, placement=rules, max_batch=1)
    assert backends(llm) == [CpuExperts, TorchExperts]
    assert llm.cpu_engine is not None
    torch_only = LLM(path, progress=False, experts="torch", max_batch=1)
    assert backends(torch_only) == [TorchExperts, TorchExperts] and torch_only.cpu_engine is None


def test_refused_before_any_weight_is_read(gguf, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("load_model ran although the plan does not fit")

    monkeypatch.setattr(llm_module, "load_model", no_loading)
    with pytest.raises(DoesNotFit, match=r"needs .* GB of RAM but 0.00 GB is given by --ram-budget"):
        LLM(gguf, progress=False, ram_budget=1e-6)


def test_split_layer_is_refused(tmp_path):
    path = write_tiny(tmp_path / "m", "deepseek_v2_lite", seed=2)
    rules = tmp_path / "rules.txt"
    rules.write_text("experts\\.w_down = cpu\n")
    with pytest.raises(TandemError, match="split layers.0.ffn.experts across cpu, cpu-engine"):
        LLM(path, progress=False, placement=rules)


def test_cli_prints_the_plan_with_the_refusal(gguf, capsys):
    assert run(["generate", str(gguf), "--prompt", "hi", "--ram-budget", "0.000001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("module group") and any(line.startswith("routed experts") for line in err)
    assert err[-1].startswith("error: the model does not fit") and "--ram-budget" in err[-1]


def test_cli_placement_flags(gguf, tmp_path, capsys):
    rules = tmp_path / "rules.txt"
    rules.write_text("experts = tpu\n")
    assert run(["generate", str(gguf), "--prompt", "hi", "--placement", str(rules)]) == 2
    assert capsys.readouterr().err == "error: rules.txt:1: unknown placement target 'tpu'; choose one of cpu-engine, gpu, cpu\n"
    assert run(["generate", str(gguf), "--prompt", "hi", "--cpu-moe", "--n-cpu-moe-layers", "1"]) == 2
    assert "give one of them" in capsys.readouterr().err
    args = ["generate", str(gguf), "--prompt", "def f", "--max-new-tokens", "3", "--temperature", "0"]
    assert run(args + ["--n-cpu-moe-layers", "1", "--max-batch", "1", "--vram-budget", "1", "--ram-budget", "64"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_fails_before_loading(gguf):
    with pytest.raises(TandemError, match="needs a CUDA GPU"):
        LLM(gguf, device="cuda", progress=False)
