"""Pieces every decoder-only model file shares: config parsing helpers, the decoder skeleton,
the checkpoint names Llama-style decoders have in common, and what the runtime reads of a config.
"""

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from tandem.errors import TandemError
from tandem.layers.linear import Linear
from tandem.layers.meta import ForwardMeta
from tandem.layers.norm import RMSNorm


def config_from_dict(cls, hf: dict, **overrides):
    """Build a frozen config dataclass from an HF config.json dict: known keys only, rest ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in hf.items() if k in names and v is not None}
    values.update(overrides)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        raise TandemError(f"config.json lacks required field(s) {', '.join(missing)} for {cls.__name__}")
    try:
        return cls(**values)
    except TypeError as e:
        raise TandemError(f"config.json does not fit {cls.__name__}: {e}") from None


# Config fields that are sizes or counts the model divides by or allocates from: must be >= 1.
POSITIVE_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "num_local_experts", "num_experts", "num_experts_per_tok", "n_group",
    "topk_group", "moe_layer_freq", "decoder_sparse_step", "q_lora_rank", "sliding_window",
})
# Ints above these are corrupt configs (the largest real models: vocab ~2**18, hidden ~2**14, ~2**7
# layers, ~2**9 experts): building a model from one allocates or loops for hours before any weight is read.
MAX_CONFIG_SIZE = 2**20
MAX_CONFIG_LAYERS = 2**12  # fields named *_layers
UNBOUNDED_FIELDS = frozenset({"max_position_embeddings", "sliding_window"})  # they size no tensor


def check_int(name: str, value) -> int:
    """An int config value (not a bool, float or string) in its field's range (see check_fields)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TandemError(f"config field {name} = {value!r} must be an integer")
    low = 2 if name == "max_position_embeddings" else 1 if name in POSITIVE_FIELDS else 0
    if value < low:
        raise TandemError(f"config field {name} = {value} is out of range: it must be >= {low}")
    high = None if name in UNBOUNDED_FIELDS else MAX_CONFIG_LAYERS if name.endswith("_layers") else MAX_CONFIG_SIZE
    if high is not None and value > high:
        raise TandemError(f"config field {name} = {value} is larger than any model has (at most {high}): "
                          "the config is corrupt")
    return value


def check_fields(cfg) -> None:
    """Types and ranges of a config dataclass's values, whatever file they came from: ints are
    ints (not bools, floats or strings), sizes and counts >= 1, other ints >= 0, max_position_embeddings
    >= 2, none above what any model has (MAX_CONFIG_SIZE, MAX_CONFIG_LAYERS), floats finite numbers,
    rms_norm_eps and rope_theta > 0, flags true or false. A TandemError names the field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        # f.type: a type (int, float, ...), a union (int | None) or, under postponed annotations, a string
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if value is None and "None" in kind:
            continue
        if kind.startswith("int"):
            check_int(f.name, value)
        elif kind.startswith("float"):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TandemError(f"config field {f.name} = {value!r} must be a finite number")
            if f.name in ("rms_norm_eps", "rope_theta") and value <= 0:
                raise TandemError(f"config field {f.name} = {value} is out of range: it must be > 0")
        elif kind == "bool" and not isinstance(value, bool):  # a string "false" would be true
            raise TandemError(f"config field {f.name} = {value!r} must be true or false")


def hf_field(hf: dict, name: str, kind: type, default=None):
    """config.json's `name` (`default` when absent or null), checked before a parser computes with
    it: an int as check_fields checks one, a bool true or false, a list (returned as a tuple)."""
    value = hf.get(name)
    if value is None:
        return default
    if kind is int:
        return check_int(name, value)
    if kind is bool and not isinstance(value, bool):
        raise TandemError(f"config field {name} = {value!r} must be true or false")
    if kind is tuple:
        if not isinstance(value, list):
            raise TandemError(f"config field {name} = {value!r} must be a list")
        return tuple(value)
    return value


def rope_scaling_items(hf: dict) -> tuple:
    """HF configs carry rope scaling as `rope_scaling` (hub) or `rope_parameters` (transformers 5)."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    return tuple(sorted((k, v) for k, v in scaling.items() if k != "rope_theta"))


def rope_theta(hf: dict, default: float = 10000.0) -> float:
    """rope_theta (or transformers 5's rope_parameters.rope_theta); a number becomes a float, anything
    else (e.g. a string "8") stays as it is, for check_fields to refuse."""
    value = hf.get("rope_theta")
    if value is None:
        value = (hf.get("rope_parameters") or {}).get("rope_theta")
    if value is None:
        return default
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class ModelConfig(Protocol):
    """What the runtime (e.g. `tandem inspect`) reads of any model's config, fields or properties."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int

    def is_moe_layer(self, i: int) -> bool: ...


LAYER = r"model\.layers\.(?P<layer>\d+)\."


def decoder_rules() -> list[tuple[str, str]]:
    """HF hub names shared by Llama-style decoders (embeddings, norms, q/k/v/o and q/k norms)."""
    return [
        (r"model\.embed_tokens\.weight", "embed.weight"),
        (r"model\.norm\.weight", "norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
        (LAYER + r"input_layernorm\.weight", "layers.{layer}.attn_norm.weight"),
        (LAYER + r"post_attention_layernorm\.weight", "layers.{layer}.ffn_norm.weight"),
        (LAYER + r"self_attn\.(?P<p>[qkvo]_proj)\.(?P<t>weight|bias)", "layers.{layer}.attn.{p}.{t}"),
        (LAYER + r"self_attn\.(?P<p>[qk]_norm)\.weight", "layers.{layer}.attn.{p}.weight"),
    ]


class Renamer:
    """Checkpoint name -> our parameter name, from an ordered list of (regex, template) rules."""

    def __init__(self, rules: list[tuple[str, str]], keep_layer: Callable[[int], bool]):
        self.rules = [(re.compile(p), t) for p, t in rules]
        self.keep_layer = keep_layer

    def __call__(self, name: str) -> str | None:
        for pattern, template in self.rules:
            m = pattern.fullmatch(name)
            if m:
                if "layer" in m.groupdict() and not self.keep_layer(int(m["layer"])):
                    return None
                return template.format(**m.groupdict())
        return None


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + ffn(norm(x)). The last add is left to the
    next layer's attn_norm (or the model's final norm), which fuses it with its normalization: a
    layer takes and returns (out, residual), the hidden state being their sum."""

    def __init__(self, attn: nn.Module, ffn: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(hidden_size, eps)
        self.attn = attn
        self.ffn_norm = RMSNorm(hidden_size, eps)
        self.ffn = ffn

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, meta: ForwardMeta, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (ffn out, residual stream); residual None: x is the whole hidden state."""
        h, residual = (self.attn_norm(x), x) if residual is None else self.attn_norm(x, residual=residual)
        h, residual = self.ffn_norm(self.attn(h, meta, cos, sin), residual=residual)  # residual += attn
        return self.ffn(h), residual


class CausalLM(nn.Module):
    """Embedding -> decoder layers -> norm -> lm_head. Subclasses build `layers` and `rope`."""

    def __init__(self, vocab_size: int, hidden_size: int, eps: float, tie_embeddings: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList()
        self.norm = RMSNorm(hidden_size, eps)
        self.lm_head = None if tie_embeddings else Linear(hidden_size, vocab_size)

    def forward(self, ids: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        """ids [T] -> fp32 logits [N, V] for the rows meta.logits_indices (all rows when None)."""
        x, residual = self.embed(ids), None
        cos, sin = self.layers[0].attn.rope.cos_sin(meta.positions)
        for layer in self.layers:
            x, residual = layer(x, residual, meta, cos, sin)
        if meta.logits_indices is not None:
            x, residual = x[meta.logits_indices], residual[meta.logits_indices]
        x, _ = self.norm(x, residual=residual)  # the last layer's add, fused
        if self.lm_head is None:  # tied: the embedding is the output head
            return torch.nn.functional.linear(x, self.embed.weight).float()
        return self.lm_head(x).float()

    def cache_widths(self) -> list[int]:
        """Elements of one cache row per layer (bytes, for an int8 MLA cache)."""
        return [layer.attn.cache_width for layer in self.layers]

    def cache_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for a model running in `dtype`: uint8 rows when its MLA layers keep
        an int8 cache (set_kv_int8), else `dtype`."""
        return torch.uint8 if any(getattr(layer.attn, "kv_int8", False) for layer in self.layers) else dtype

    def set_kv_int8(self) -> None:
        """Keep the KV cache in int8 (MLA: ops.reference.mla_int8_layout; about half of bf16). Call
        before the cache is made."""
        if not all(hasattr(layer.attn, "kv_int8") for layer in self.layers):
            raise TandemError("an int8 KV cache is implemented for MLA models (DeepSeek-V2/V3/R1) only")
        for layer in self.layers:
            layer.attn.kv_int8 = True
