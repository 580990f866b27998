"""DeepSeek-specific loading behaviour (the HF comparison of every family is in test_vs_hf.py)."""

import pytest
import torch

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
