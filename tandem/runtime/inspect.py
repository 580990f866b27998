"""What is in a model, from its config and tensor headers alone (nothing is loaded).

For GGUF models it also lists every tensor's quant type, shape and bytes, with tensors that
differ only in their layer number folded into one line (`blk.[1-26].ffn_down_exps.weight`).
"""

import math
import re
from collections import defaultdict
from pathlib import Path

from tandem.runtime.loader import open_model_files
from tandem.weights.checkpoint import Checkpoint

ROUTED_EXPERT = re.compile(r".*\.experts\.\d+\..*|.*_exps\..*")  # HF per-expert names, GGUF merged names
_LAYER = re.compile(r"blk\.(\d+)\.(.*)")


def describe(model_dir: str | Path, config_dir: str | Path | None = None) -> dict:
    with open_model_files(model_dir, config_dir) as files:
        cls, cfg = files.model_class(), files.config()
        if files.gguf is None:
            with Checkpoint.open(files.path) as ckpt:
                tensors = [(n, ckpt.shape(n), _kind(ckpt, n), ckpt.nbytes(n)) for n in ckpt.names()]
                file_bytes = ckpt.total_bytes
            architecture = ", ".join(files.hf.get("architectures") or [files.hf.get("model_type", "?")])
        else:
            ckpt = files.gguf
            tensors = [(n, ckpt.shape(n), ckpt.qtype(n), ckpt.nbytes(n)) for n in ckpt.names()]
            file_bytes = sum(p.stat().st_size for p in ckpt.parts)
            meta = ckpt.metadata
            architecture = f"{meta.get('general.architecture', '?')} (GGUF, {len(ckpt.parts)} file(s))"
            if meta.get("general.name"):
                architecture += f" {meta['general.name']!r}"
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # dtype / quant type -> [tensors, bytes]
    total = routed = 0
    for name, shape, kind, nbytes in tensors:
        n = math.prod(shape)
        total += n
        routed += n if ROUTED_EXPERT.fullmatch(name) else 0
        by_kind[kind][0] += 1
        by_kind[kind][1] += nbytes
    # Every model config offers these names (models.common.ModelConfig), as fields or properties.
    experts, top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
    active = total - routed + (routed * top_k // experts if experts else 0)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    info = {
        "architecture": architecture,
        "model class": cls.__name__,
        "layers": f"{cfg.num_hidden_layers} ({cfg.num_hidden_layers - moe_layers} dense, {moe_layers} MoE)",
        "hidden size": cfg.hidden_size,
        "attention heads": cfg.num_attention_heads,
        "routed experts": f"{experts} (top-{top_k}), shared {cfg.n_shared_experts}",
        "vocab size": cfg.vocab_size,
        "context": cfg.max_position_embeddings,
        "parameters": f"{total:,} total, {active:,} active per token",
        "routed expert share": f"{100 * routed / total:.1f}% of parameters" if total else "-",
        "dtypes" if files.gguf is None else "quant types": {
            k: f"{v[0]} tensors, {v[1]:,} bytes" for k, v in sorted(by_kind.items())
        },
        "file bytes": f"{file_bytes:,}",
    }
    if files.gguf is not None:
        info["tensors"] = _tensor_lines(tensors)
    return info


def _kind(ckpt: Checkpoint, name: str) -> str:
    return "float8_e4m3fn+scale" if ckpt.is_fp8(name) else str(ckpt.dtype(name)).removeprefix("torch.")


def _tensor_lines(tensors: list) -> dict[str, str]:
    """name -> 'TYPE [shape] bytes'; tensors equal but for their layer number share one line."""
    groups: dict[tuple, list[int]] = {}
    for name, shape, kind, nbytes in tensors:
        m = _LAYER.fullmatch(name)
        key = (m[2] if m else name, kind, tuple(shape), nbytes, m is not None)
        groups.setdefault(key, []).append(int(m[1]) if m else -1)
    lines = {}
    for (rest, kind, shape, nbytes, per_layer), layers in groups.items():
        name = f"blk.{_ranges(layers)}.{rest}" if per_layer else rest
        count = f"{len(layers)} x " if len(layers) > 1 else ""
        lines[name] = f"{kind:<5} {list(shape)}  {count}{nbytes:,} bytes"
    return lines


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 5] -> '[1-3,5]'; a single layer stays bare."""
    if len(layers) == 1:
        return str(layers[0])
    spans, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur is None or cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return f"[{','.join(spans)}]"


def format_description(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key:<{width}}")
            inner = max(width - 2, *(len(k) for k in value)) if value else width - 2
            lines += [f"  {k:<{inner}}  {v}" for k, v in value.items()]
        else:
            lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
