"""Qwen2-MoE, Qwen3-MoE and Mixtral (GQA attention + the one MoE block): variants, layer plans,
config errors (their HF comparison is in test_vs_hf.py)."""

import pytest
import torch

from tandem.errors import TandemError
from tandem.models.registry import build_model, model_class
from tandem.testing.tiny import QWEN_MOE_VARIANTS, VARIANTS



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


@pytest.mark.parametrize(
    "name, change, field",
    [
        ("qwen2_moe", dict(num_hidden_layers="2"), "num_hidden_layers"),
        ("qwen2_moe", dict(num_hidden_layers=10**6), "num_hidden_layers"),
        ("qwen2_moe", dict(hidden_size="64"), "hidden_size"),
        ("qwen2_moe", dict(num_attention_heads=0), "num_attention_heads"),
        ("qwen2_moe", dict(max_window_layers="x"), "max_window_layers"),
        ("qwen2_moe", dict(layer_types=5), "layer_types"),
        ("qwen2_moe", dict(mlp_only_layers="1"), "mlp_only_layers"),
        ("qwen2_moe", dict(num_key_value_heads=0), "num_key_value_heads"),
        ("qwen2_moe", dict(head_dim=0), "head_dim"),
        ("qwen3_moe", dict(attention_bias="false"), "attention_bias"),
        ("mixtral", dict(num_attention_heads="8"), "num_attention_heads"),
    ],
)
def test_from_hf_checks_what_it_computes_with_first(name, change, field):
    """Fuzzing: Qwen2-MoE's from_hf built per-layer tuples (and divided sizes) from unchecked values,
    so bad input failed with an unrelated TypeError, or built a tuple of a million layers first."""
    cls = model_class(VARIANTS[name]).config_class
    hf = dict(VARIANTS[name], vocab_size=64, architectures=[], **change)
    with pytest.raises(TandemError, match=f"config field {field} = "):
        cls.from_hf(hf)


@pytest.mark.parametrize("change, message", [
    (dict(layer_types=["full_attention", "linear_attention"]), "layer_types holds 'linear_attention'"),
    (dict(mlp_only_layers=["1"]), "mlp_only_layers"), (dict(mlp_only_layers=[-1]), "mlp_only_layers"),
])
def test_qwen_layer_lists_hold_what_they_say(change, message):
    # A typo here used to pass: the layer kept full attention or stayed MoE without a word.
    from tandem.models.qwen_moe import QwenMoeConfig

    with pytest.raises(TandemError, match=message):
        QwenMoeConfig.from_hf(dict(VARIANTS["qwen2_moe"], vocab_size=64, architectures=[], **change))


def test_registry_knows_the_new_architectures():
    for arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"):
        assert model_class({"architectures": [arch]}).__name__ in ("QwenMoeForCausalLM", "MixtralForCausalLM")
    with pytest.raises(TandemError, match="MixtralForCausalLM.*Qwen2MoeForCausalLM.*Qwen3MoeForCausalLM"):
        model_class({"architectures": ["GrokForCausalLM"]})
