"""Qwen2-MoE, Qwen3-MoE and Mixtral (GQA attention + the one MoE block) against HF transformers
on tiny random models, fp32: prefill logits, cached decode vs recompute, greedy tokens."""

import pytest
import torch

from tandem.errors import TandemError
from tandem.models.registry import build_model, model_class
from tandem.runtime.loader import load_model
from tandem.testing.tiny import MIXTRAL_VARIANTS, QWEN_MOE_VARIANTS, VARIANTS, write_tiny
from tests.conftest import Stepper, margin_steps, rel_err

transformers = pytest.importorskip("transformers")
BOUND = 1e-4  # fp32 logits, max|diff| / max|ref|
NAMES = sorted(QWEN_MOE_VARIANTS) + sorted(MIXTRAL_VARIANTS)


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp(request.param), request.param, seed=7)
    ours = load_model(path, torch.float32, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    return ours, ref


def prompt(n: int, vocab: int = 512, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def test_prefill_logits_match_hf(pair):
    ours, ref = pair
    tokens = prompt(64)
    expected = ref(torch.tensor([tokens])).logits[0]
    got = Stepper(ours).feed(tokens)
    assert rel_err(got, expected) <= BOUND


@torch.inference_mode()
def test_cached_decode_equals_recompute(pair):
    ours, _ = pair
    tokens = prompt(64, seed=5)
    full = Stepper(ours).feed(tokens)
    step = Stepper(ours)
    parts = [step.feed(tokens[:40])] + [step.feed([t]) for t in tokens[40:]]
    assert rel_err(torch.cat(parts), full) <= BOUND


@torch.inference_mode()
def test_greedy_tokens_match_hf_under_margin_rule(pair):
    ours, ref = pair
    start = prompt(8, seed=11)
    out = ref.generate(torch.tensor([start]), max_new_tokens=48, do_sample=False, min_new_tokens=48)
    seq = out[0].tolist()
    ref_logits = ref(out).logits[0, len(start) - 1 : -1]  # teacher-forced on HF's own tokens
    step = Stepper(ours)
    first = step.feed(start, all_logits=False)
    ours_logits = torch.cat([first] + [step.feed([t]) for t in seq[len(start) : -1]])
    assert rel_err(ours_logits, ref_logits) <= BOUND
    checked, bad = margin_steps(ours_logits, ref_logits, BOUND)
    assert checked >= 32 and not bad, (checked, bad)


def test_variants_cover_what_they_claim():
    """The sliding windows are shorter than the 64-token test prompt, so they change the logits."""
    gqa = [v for v in VARIANTS.values() if "num_key_value_heads" in v]
    ratios = {(v["model_type"][:4], v["num_attention_heads"] // v["num_key_value_heads"]) for v in gqa}
    assert {r for t, r in ratios if t == "qwen"} >= {1, 2, 4} and {r for t, r in ratios if t == "mixt"} >= {1, 2, 4}
    windows = [v["sliding_window"] for v in VARIANTS.values() if v.get("sliding_window")]
    assert len(windows) >= 4 and max(windows) < 64
    qwen2 = [v for v in QWEN_MOE_VARIANTS.values() if v["model_type"] == "qwen2_moe"]
    shared = {v.get("shared_expert_intermediate_size", 0) > 0 for v in qwen2}
    assert shared == {True, False}


def test_layer_plan_follows_the_config():
    """mlp_only_layers / decoder_sparse_step pick the dense layers; Qwen2's window slides on even early layers."""
    from tandem.layers.moe import MoE

    def plan(name, **extra):
        hf = dict(VARIANTS[name], vocab_size=64, architectures=[], **extra)
        with torch.device("meta"):
            model = build_model(hf)
        return [isinstance(layer.ffn, MoE) for layer in model.layers], [layer.attn.cfg.sliding_window for layer in model.layers]

    assert plan("qwen2_moe_dense_mid") == ([True, False, True], [None] * 3)
    assert plan("qwen2_moe_window") == ([False, True, False], [20, None, None])
    assert plan("qwen2_moe", sliding_window=16)[1] == [None, None]  # hub configs: a window, but off
    assert plan("qwen3_moe_window")[1] == [24, 24]
    assert plan("qwen3_moe_odd", use_sliding_window=False, sliding_window=4)[0] == [False, True, True]
    assert plan("mixtral_odd", num_hidden_layers=2) == ([True, True], [7, 7])


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("qwen3_moe", dict(num_key_value_heads=3), "multiple of key/value heads"),
        ("qwen2_moe", dict(hidden_act="gelu"), "hidden_act"),
        ("qwen2_moe", dict(use_sliding_window=True, sliding_window=None), "sliding_window"),
        ("qwen2_moe", dict(decoder_sparse_step=0), "decoder_sparse_step"),
        ("mixtral", dict(num_experts_per_tok=9), "experts per token"),
        ("mixtral", dict(sliding_window=0), "sliding_window"),
        ("mixtral", dict(num_local_experts=None), "num_local_experts"),
    ],
)
def test_bad_configs_fail_loudly(name, change, message):
    hf = dict(VARIANTS[name], vocab_size=64, architectures=[])
    hf.update(change)
    with pytest.raises(TandemError, match=message), torch.device("meta"):
        build_model(hf)


def test_registry_knows_the_new_architectures():
    for arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"):
        assert model_class({"architectures": [arch]}).__name__ in ("QwenMoeForCausalLM", "MixtralForCausalLM")
    with pytest.raises(TandemError, match="MixtralForCausalLM.*Qwen2MoeForCausalLM.*Qwen3MoeForCausalLM"):
        model_class({"architectures": ["GrokForCausalLM"]})
