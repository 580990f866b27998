"""Model directory -> a built model with its weights, streamed tensor by tensor.

The model is built on the meta device (no memory, no init), given real storage once, and filled
from the checkpoint one tensor at a time, so a model is never held twice.
"""

import json
from pathlib import Path

import torch

from tandem.errors import TandemError
from tandem.models.registry import build_model
from tandem.weights.checkpoint import Checkpoint
from tandem.weights.loader import load_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.exists():
        raise TandemError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise TandemError(f"model path {str(path)!r} is not a directory; give an HF model directory")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise TandemError(f"{cfg} is missing: an HF model directory needs config.json beside its weights")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TandemError(f"{cfg} is not valid JSON ({e})") from None


def resolve_dtype(name: str, hf_config: dict) -> torch.dtype:
    """'auto': fp32 checkpoints stay fp32; anything else runs in bf16 (fp16 is slow on CPUs)."""
    if name == "auto":
        stored = hf_config.get("torch_dtype") or hf_config.get("dtype")
        return torch.float32 if stored == "float32" else torch.bfloat16
    if name not in DTYPES:
        raise TandemError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(model_dir: str | Path, dtype: torch.dtype, device="cpu", progress: bool = True) -> torch.nn.Module:
    hf = read_config(model_dir)
    with torch.device("meta"):
        model = build_model(hf)
    model = model.to(dtype)
    for module in model.modules():
        # Routers stay fp32: top-k choices must not flip because of bf16 rounding.
        if getattr(module, "KEEP_FP32", False):
            module.float()
    model = model.to_empty(device=device)
    with Checkpoint.open(model_dir) as ckpt:
        load_state(ckpt, dict(model.named_parameters()), model.renamer(), ignore=model.ignore, progress=progress)
    return model.eval()
