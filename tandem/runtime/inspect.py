"""What is in a model directory, from config.json and tensor headers alone (nothing is loaded)."""

import re
from collections import defaultdict
from pathlib import Path

from tandem.models.registry import model_class
from tandem.runtime.loader import read_config
from tandem.weights.checkpoint import Checkpoint

ROUTED_EXPERT = re.compile(r".*\.experts\.\d+\..*")


def describe(model_dir: str | Path) -> dict:
    hf = read_config(model_dir)
    cls = model_class(hf)
    cfg = cls.config_class.from_hf(hf)
    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # dtype -> [tensors, bytes]
    total = routed = 0
    with Checkpoint.open(model_dir) as ckpt:
        for name in ckpt.names():
            n = 1
            for d in ckpt.shape(name):
                n *= d
            total += n
            routed += n if ROUTED_EXPERT.fullmatch(name) else 0
            kind = "float8_e4m3fn+scale" if ckpt.is_fp8(name) else str(ckpt.dtype(name)).removeprefix("torch.")
            by_dtype[kind][0] += 1
            by_dtype[kind][1] += ckpt.nbytes(name)
        file_bytes = ckpt.total_bytes
    experts = getattr(cfg, "n_routed_experts", 0)
    top_k = getattr(cfg, "num_experts_per_tok", 0)
    active = total - routed + (routed * top_k // experts if experts else 0)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return {
        "architecture": ", ".join(hf.get("architectures") or [hf.get("model_type", "?")]),
        "model class": cls.__name__,
        "layers": f"{cfg.num_hidden_layers} ({cfg.num_hidden_layers - moe_layers} dense, {moe_layers} MoE)",
        "hidden size": cfg.hidden_size,
        "attention heads": cfg.num_attention_heads,
        "routed experts": f"{experts} (top-{top_k}), shared {getattr(cfg, 'n_shared_experts', 0)}",
        "vocab size": cfg.vocab_size,
        "context": cfg.max_position_embeddings,
        "parameters": f"{total:,} total, {active:,} active per token",
        "routed expert share": f"{100 * routed / total:.1f}% of parameters" if total else "-",
        "dtypes": {k: f"{v[0]} tensors, {v[1]:,} bytes" for k, v in sorted(by_dtype.items())},
        "file bytes": f"{file_bytes:,}",
    }


def format_description(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key:<{width}}")
            lines += [f"  {k:<{width - 2}}  {v}" for k, v in value.items()]
        else:
            lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
