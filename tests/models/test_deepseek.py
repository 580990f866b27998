"""DeepSeek-specific loading behaviour (the HF comparison of every family is in test_vs_hf.py)."""

import pytest
import torch

from tandem.errors import TandemError
from tandem.runtime.loader import load_model
from tandem.testing.tiny import write_tiny


def test_multi_token_prediction_layers_are_skipped(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from tandem.errors import TandemError

    path = write_tiny(tmp_path, "deepseek_v3", seed=1)
    tensors = load_file(path / "model.safetensors")
    n = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    extra = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): v for k, v in tensors.items() if f"layers.{n - 1}." in k}
    extra = {k: v.clone() for k, v in extra.items()}
    save_file({**tensors, **extra}, path / "model.safetensors")
    with pytest.raises(TandemError, match="unexpected"):
        load_model(path, torch.float32, progress=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    assert len(load_model(path, torch.float32, progress=False).layers) == n


@pytest.mark.parametrize("bad", [
    {"num_hidden_layers": 0}, {"num_attention_heads": -4}, {"num_experts_per_tok": True},
    {"rms_norm_eps": -1.0}, {"rope_theta": float("nan")}, {"num_hidden_layers": 2.5}, {"q_lora_rank": "48"},
    {"moe_layer_freq": 0}, {"max_position_embeddings": 1},
])
def test_config_numbers_of_the_wrong_type_or_range_are_refused(bad):
    """Found by fuzzing: such values ended in ZeroDivisionError, negative dimensions or NaN logits."""
    from tandem.models.deepseek import DeepseekConfig

    DeepseekConfig(**BASE)
    with pytest.raises(TandemError, match=f"config field {next(iter(bad))} = "):
        DeepseekConfig(**{**BASE, **bad})


BASE = dict(vocab_size=10, hidden_size=8, intermediate_size=8, moe_intermediate_size=8, num_hidden_layers=2,
            num_attention_heads=2, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4,
            n_routed_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("bad, message", [
    ({"vocab_size": 10**30}, "larger than any model has"), ({"hidden_size": 2**21}, "larger than any model has"),
    ({"n_routed_experts": 10**7}, "larger than any model has"), ({"num_hidden_layers": 5000}, "at most 4096"),
    ({"num_nextn_predict_layers": 10**6}, "at most 4096"), ({"norm_topk_prob": "false"}, "must be true or false"),
    ({"attention_bias": 1}, "must be true or false"),
])
def test_config_sizes_no_model_has_and_flags_that_are_no_bools_are_refused_by_the_config(bad, message):
    """Fuzzing: only the loader bounded sizes and checked flags, so a config built any other way took
    them (and then allocated or looped until memory ran out)."""
    from tandem.models.deepseek import DeepseekConfig

    with pytest.raises(TandemError, match=f"config field {next(iter(bad))} = .*{message}"):
        DeepseekConfig(**{**BASE, **bad})


@pytest.mark.parametrize("theta", ["8", 0, True, [8]])
def test_rope_theta_in_config_json_must_be_a_positive_number(theta):
    """Fuzzing: rope_theta "8" was read as 8.0 (and 0 as the default 10000), silently."""
    from tandem.models.deepseek import DeepseekConfig

    assert DeepseekConfig.from_hf({**BASE, "rope_theta": 50000}).rope_theta == 50000.0
    with pytest.raises(TandemError, match="config field rope_theta = "):
        DeepseekConfig.from_hf({**BASE, "rope_theta": theta})
