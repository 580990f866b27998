"""The built-in demo model: a small DeepSeek-V3-architecture MoE trained on Python's standard
library (scripts/train_demo_model.py), shipped inside the package so `tandem chat` works offline."""

from pathlib import Path

from tandem.errors import TandemError


def demo_model_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "demo_model"
    if not (path / "config.json").is_file():
        raise TandemError(f"the built-in demo model is missing from {path}; reinstall tandem or give a MODEL path")
    return path
