"""The layers' fused path (ops.triton.fused: RMSNorm + residual, RoPE, MLA's cache write, routing)
against the reference path, on every tiny family, through the whole model: prefill and decode
steps, teacher-forced, fp32. The GPU takes the fused path; here Triton's interpreter runs the same
kernels on CPU tensors (layers.norm.FUSED_ON_CPU).
"""

import pytest
import torch

from tandem.layers import norm
from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.llm import LLM
from tandem.runtime.runner import Runner
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.scheduler import Batch, Sequence
from tandem.testing.tiny import VARIANTS, write_tiny
from tests.conftest import margin_steps, rel_err

BOUND = 1e-5  # fp32; the kernels reduce in another order than torch
STEPS = 24


def logits(llm: LLM, tokens: list[int], n_prompt: int) -> torch.Tensor:
    """The prompt's last row, then one decode step per token, each on the tokens given."""
    cache = PagedKVCache(llm.model.cache_widths(), 2 * -(-len(tokens) // 8), 8, llm.dtype, "cpu")
    runner, seq, rows = Runner(llm.model, cache, "cpu"), Sequence(0, [], SamplingParams()), []
    for chunk in [tokens[:n_prompt]] + [[t] for t in tokens[n_prompt:-1]]:
        cache.grow(seq.block_table, seq.num_cached + len(chunk))
        rows.append(runner.run(Batch([seq], [chunk], is_prefill=seq.num_cached == 0)))
        seq.num_cached += len(chunk)
    return torch.cat(rows)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_path_equals_reference_path(tmp_path, variant, monkeypatch):
    llm = LLM(write_tiny(tmp_path, variant, seed=5), dtype="float32", progress=False, max_batch=1, experts="torch")
    prompt = llm.tokenizer.encode("def parse(text):\n    return")
    tokens = prompt + llm.generate(prompt, max_new_tokens=STEPS, temperature=0, ignore_eos=True).token_ids
    want = logits(llm, tokens, len(prompt))
    monkeypatch.setattr(norm, "FUSED_ON_CPU", True)
    got = logits(llm, tokens, len(prompt))
    assert rel_err(got, want) <= BOUND
    checked, bad = margin_steps(got, want, BOUND)
    assert checked >= 16 and not bad, (checked, bad)


def test_fused_path_runs_the_kernels(tmp_path, monkeypatch):
    # Guards the test above: with the switch on, the layers really call the fused kernels.
    from tandem.ops.triton import fused, route

    calls = []
    for module, name in ((fused, "rms_norm"), (fused, "rope"), (fused, "mla_cache_write"), (route, "route"),
                         (route, "route_x")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setattr(norm, "FUSED_ON_CPU", True)
    llm = LLM(write_tiny(tmp_path, "deepseek_v3", seed=5), dtype="float32", progress=False, max_batch=1, experts="torch")
    llm.generate(list(range(1, 9)), max_new_tokens=2, temperature=0, ignore_eos=True)  # 8 tokens: route; 1: route_x
    assert set(calls) == {"rms_norm", "rope", "mla_cache_write", "route", "route_x"}


@pytest.mark.parametrize("fused", [False, True])
def test_mlp_with_merged_gate_up_equals_the_separate_layers(monkeypatch, fused):
    from tandem.layers.linear import MLP, Linear

    torch.manual_seed(0)
    mlp = MLP(64, 48)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = mlp(x)
    merged = Linear(64, 96)
    merged.weight = torch.nn.Parameter(torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)))
    mlp.merge_gate_up(merged)
    assert not hasattr(mlp, "gate_proj") and not hasattr(mlp, "up_proj")
    monkeypatch.setattr(norm, "FUSED_ON_CPU", fused)
    with torch.no_grad():
        got = mlp(x)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("variant", ["deepseek_v3", "deepseek_v2_lite"])  # q through q_a / q_b, and q_proj
@pytest.mark.parametrize("fused", [False, True])
def test_mla_with_merged_q_and_kv_a_equals_the_separate_layers(tmp_path, monkeypatch, variant, fused):
    """Each MLA layer's two projections of x as one layer ([q or q_a | latent | k_pe] rows), as the
    runtime merges GPU block layers: the same logits over a prompt (rows split and made contiguous)
    and decode steps."""
    from tandem.layers.attention import MLAttention
    from tandem.layers.linear import Linear

    monkeypatch.setattr(norm, "FUSED_ON_CPU", fused)
    llm = LLM(write_tiny(tmp_path, variant, seed=7), dtype="float32", progress=False, max_batch=1, experts="torch")
    prompt = llm.tokenizer.encode("def parse(text):\n    return")
    tokens = prompt + llm.generate(prompt, max_new_tokens=STEPS, temperature=0, ignore_eos=True).token_ids
    want = logits(llm, tokens, len(prompt))
    layers = [m for m in llm.model.modules() if isinstance(m, MLAttention)]
    for attn in layers:
        first, kv_a = attn.q_in, attn.kv_a_proj_with_mqa
        merged = Linear(first.weight.shape[1], first.weight.shape[0] + kv_a.weight.shape[0])
        merged.weight = torch.nn.Parameter(torch.cat((first.weight, kv_a.weight)))
        attn.merge_q_kv_a(merged)
        assert not hasattr(attn, "kv_a_proj_with_mqa") and attn.q_kv_a is merged
    got = logits(llm, tokens, len(prompt))
    assert layers and rel_err(got, want) <= 1e-6
    checked, bad = margin_steps(got, want, 1e-6)
    assert checked >= 16 and not bad, (checked, bad)
