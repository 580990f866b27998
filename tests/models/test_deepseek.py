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

    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, moe_intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4,
                n_routed_experts=4, num_experts_per_tok=2)
    DeepseekConfig(**base)
    with pytest.raises(TandemError, match=f"config field {next(iter(bad))} = "):
        DeepseekConfig(**{**base, **bad})
