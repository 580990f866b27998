"""The real models' shapes, their GGUF tensor lists, and the Q4_K_M mix llama-quantize gives them.

Configs are the models' HF config.json files (sources beside each entry); tensor names, shapes
and order are what llama.cpp's convert_hf_to_gguf.py + llama-quantize write. Shapes are in torch
order (outermost first): a merged expert tensor is (E, out, in), GGUF stores it as [in, out, E].

`tensor_list(arch, layers, qtype)` computes every tensor (name, shape, format, bytes) without
writing anything, so tests can check full-size models and benchmarks can count expert bytes.

Truncation: `layers` keeps the first N layers of the real model (DeepSeek keeps its dense lead
layers, then N - dense MoE layers; with N <= dense it keeps N - 1 dense so one MoE layer remains).
The quant mix is, by default, the one the FULL model gets (`mix_depth="full"`: the file is the
first N layers of the real Q4_K_M file); "truncated" applies llama-quantize's rules to an N-layer
model instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tandem.errors import TandemError
from tandem.weights.quant import row_bytes

# HF config.json fields that shape the model (only those); `family` is the GGUF architecture.
ARCHS: dict[str, dict] = {
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
    "deepseek-v3": {
        "family": "deepseek2", "name": "DeepSeek-V3", "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 8,
        "topk_group": 4, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "norm_topk_prob": True,
        "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                          "mscale_all_dim": 1.0},
        "bos": 0, "eos": 1, "pre": "deepseek-v3",
    },
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json
    "deepseek-v2-lite": {
        "family": "deepseek2", "name": "DeepSeek-V2-Lite", "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "q_lora_rank": None,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "norm_topk_prob": False,
        "vocab_size": 102400, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                          "mscale_all_dim": 0.707},
        # The real GGUF's pre-tokenizer is "deepseek-llm", which tandem's GGUF tokenizer lacks.
        "bos": 100000, "eos": 100001, "pre": "deepseek-v3",
    },
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json
    "qwen3-30b-a3b": {
        "family": "qwen3moe", "name": "Qwen3-30B-A3B", "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "n_routed_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "bos": 151643, "eos": 151645,
        "pre": "qwen2",
    },
    # https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json
    "qwen3-235b-a22b": {
        "family": "qwen3moe", "name": "Qwen3-235B-A22B", "hidden_size": 4096, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4,
        "head_dim": 128, "n_routed_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "bos": 151643, "eos": 151645,
        "pre": "qwen2",
    },
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json (the real GGUF has a
    # SentencePiece vocabulary; ours is byte-level BPE of the same size).
    "mixtral-8x7b": {
        "family": "llama", "name": "Mixtral-8x7B", "hidden_size": 4096, "intermediate_size": 14336,
        "moe_intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "n_routed_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "bos": 1, "eos": 2, "pre": "default",
    },
}
QTYPES = ("Q4_K_M", "Q8_0", "BF16")
# llama-quantize's fallbacks for rows its K-quant blocks (256) do not divide (tensor_type_fallback).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q8_0": "F16"}


@dataclass(frozen=True)
class SynthTensor:
    name: str
    shape: tuple[int, ...]  # torch order
    format: str  # tandem.weights.quant format name
    nbytes: int
    role: str  # how values are drawn: weight, norm (ones), router, bias (zeros)


@dataclass(frozen=True)
class SynthModel:
    """One synthetic file's plan: the (possibly truncated or scaled) config and its tensors."""

    arch: str
    config: dict
    layers: int
    full_layers: int
    dense_layers: int
    qtype: str
    tensors: tuple[SynthTensor, ...]

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def arch_config(arch: str) -> dict:
    if arch not in ARCHS:
        raise TandemError(f"unknown synthetic architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return dict(ARCHS[arch])


def plan(arch: str, layers: int | None = None, qtype: str = "Q4_K_M", scale: int = 1,
         mix_depth: str = "full") -> SynthModel:
    """The tensors of `arch` truncated to `layers` (default: all), stored as `qtype`."""
    cfg = arch_config(arch)
    if qtype not in QTYPES:
        raise TandemError(f"unknown --qtype {qtype!r}; choose one of {', '.join(QTYPES)}")
    if mix_depth not in ("full", "truncated"):
        raise TandemError(f"--mix-depth must be 'full' or 'truncated', got {mix_depth!r}")
    if not isinstance(scale, int) or scale < 1:
        raise TandemError(f"--scale must be an integer >= 1, got {scale!r}")
    full = cfg["num_hidden_layers"]
    layers = full if layers is None else layers
    lead = cfg.get("first_k_dense_replace", 0)
    if not 1 + (lead > 0) <= layers <= full:
        raise TandemError(f"--layers for {arch} must be in {1 + (lead > 0)}..{full}, got {layers}")
    dense = min(lead, layers - 1) if lead else 0
    if scale > 1:
        cfg = scaled_config(cfg, scale)
    cfg.update(num_hidden_layers=layers, first_k_dense_replace=dense)
    tensors = _tensors(cfg, layers, dense)
    mix_layers = full if mix_depth == "full" else layers
    stored = []
    for name, shape, role in tensors:
        fmt = storage(name, shape, qtype, mix_layers, cfg["n_routed_experts"])
        stored.append(SynthTensor(name, shape, fmt, _nbytes(fmt, shape), role))
    return SynthModel(arch, cfg, layers, full, dense, qtype, tuple(stored))


def _nbytes(fmt: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) * row_bytes(fmt, shape[-1])


def _shrink(d: int, s: int) -> int:
    """d / s, keeping what matters to the quant mix: multiples of 256 stay multiples of 256; other
    multiples of 32 stay multiples of 32 that 256 does not divide (so fallbacks still happen)."""
    if d % 256 == 0:
        return max(256, d // s // 256 * 256)
    x = max(32, d // s // 32 * 32)
    return x + 32 if x % 256 == 0 else x


def scaled_config(cfg: dict, s: int) -> dict:
    """A debug variant `s` times narrower (NOT the real shapes): for tests on small machines."""
    cfg = dict(cfg)
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank"):
        if cfg.get(key):
            cfg[key] = _shrink(cfg[key], s)
    kv = cfg.get("num_key_value_heads")
    if kv:
        cfg["num_key_value_heads"] = max(1, kv // s)
        group = cfg["num_attention_heads"] // kv
        cfg["num_attention_heads"] = cfg["num_key_value_heads"] * max(1, group // s)
    else:
        cfg["num_attention_heads"] = max(1, cfg["num_attention_heads"] // s)
    groups, k = cfg.get("n_group") or 1, cfg["num_experts_per_tok"]
    e = max(cfg["n_routed_experts"] // s, 2 * k, 2 * groups)
    cfg["n_routed_experts"] = -(-e // groups) * groups
    vocab = max(1024, cfg["vocab_size"] // s // 256 * 256)
    # Special ids keep their distance from the end of the vocabulary, folded into its last half
    # when the narrower vocabulary is shorter than that distance (distinct ids stay distinct).
    for key in ("bos", "eos"):
        if cfg[key] >= vocab:
            cfg[key] = vocab - 1 - (cfg["vocab_size"] - cfg[key] - 1) % (vocab // 2)
    cfg["vocab_size"], cfg["scale"] = vocab, s
    return cfg


def _tensors(c: dict, layers: int, dense: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) in llama-quantize's output order: top-level tensors by name, then each
    layer's by name (its weights map sorts by layer number, then name)."""
    h, v = c["hidden_size"], c["vocab_size"]
    top = [("output.weight", (v, h), "weight"), ("output_norm.weight", (h,), "norm"),
           ("token_embd.weight", (v, h), "weight")]
    out = list(top)
    for i in range(layers):
        block = _deepseek_layer(c, i < dense) if c["family"] == "deepseek2" else _gqa_layer(c)
        out += sorted((f"blk.{i}.{n}", s, r) for n, s, r in block)
    return out


def _deepseek_layer(c: dict, is_dense: bool) -> list:
    h, heads, rank, rope = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    nope, vdim, q_rank = c["qk_nope_head_dim"], c["v_head_dim"], c.get("q_lora_rank")
    t = [("attn_norm.weight", (h,), "norm"), ("ffn_norm.weight", (h,), "norm"),
         ("attn_kv_a_mqa.weight", (rank + rope, h), "weight"), ("attn_kv_a_norm.weight", (rank,), "norm"),
         # newer converters split kv_b for absorbed MLA: k_b stored transposed, [heads, rank, nope]
         ("attn_k_b.weight", (heads, rank, nope), "weight"), ("attn_v_b.weight", (heads, vdim, rank), "weight"),
         ("attn_output.weight", (h, heads * vdim), "weight")]
    if q_rank:
        t += [("attn_q_a.weight", (q_rank, h), "weight"), ("attn_q_a_norm.weight", (q_rank,), "norm"),
              ("attn_q_b.weight", (heads * (nope + rope), q_rank), "weight")]
    else:
        t += [("attn_q.weight", (heads * (nope + rope), h), "weight")]
    if is_dense:
        i = c["intermediate_size"]
        return t + [("ffn_gate.weight", (i, h), "weight"), ("ffn_up.weight", (i, h), "weight"),
                    ("ffn_down.weight", (h, i), "weight")]
    e, i, shared = c["n_routed_experts"], c["moe_intermediate_size"], c["n_shared_experts"] * c["moe_intermediate_size"]
    t += _experts(e, i, h) + [("ffn_gate_shexp.weight", (shared, h), "weight"),
                              ("ffn_up_shexp.weight", (shared, h), "weight"),
                              ("ffn_down_shexp.weight", (h, shared), "weight")]
    if c["scoring_func"] == "sigmoid":  # V3's bias-corrected choice
        t.append(("exp_probs_b.bias", (e,), "bias"))
    return t


def _gqa_layer(c: dict) -> list:
    h, hd = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    t = [("attn_norm.weight", (h,), "norm"), ("ffn_norm.weight", (h,), "norm"),
         ("attn_q.weight", (q, h), "weight"), ("attn_k.weight", (kv, h), "weight"),
         ("attn_v.weight", (kv, h), "weight"), ("attn_output.weight", (h, q), "weight")]
    if c["family"] == "qwen3moe":  # per-head q/k RMSNorm
        t += [("attn_q_norm.weight", (hd,), "norm"), ("attn_k_norm.weight", (hd,), "norm")]
    return t + _experts(c["n_routed_experts"], c["moe_intermediate_size"], h)


def _experts(e: int, i: int, h: int) -> list:
    return [("ffn_gate_inp.weight", (e, h), "router"), ("ffn_gate_exps.weight", (e, i, h), "weight"),
            ("ffn_up_exps.weight", (e, i, h), "weight"), ("ffn_down_exps.weight", (e, h, i), "weight")]


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def storage(name: str, shape: tuple[int, ...], qtype: str, n_layers: int, n_expert: int) -> str:
    """The format llama.cpp gives one tensor in a `qtype` file (llama-quant.cpp, 2025-26).

    Not quantized (kept as the converter wrote them): 1-D tensors and the router (F32). BF16 files
    keep every other tensor BF16. Q8_0: all Q8_0. Q4_K_M: Q4_K, with Q6_K for output.weight,
    ffn_down* of use_more_bits layers and attn_v-like tensors (attn_v, attn_kv_b) of those
    layers; 8-expert models (Mixtral) take Q8_0 for attn_v / attn_k and Q5_K for attn_output.
    Rows that 256 does not divide fall back (Q4_K -> Q5_0, Q6_K -> Q8_0), then to F16.
    DeepSeek's split attn_v_b is no attn_v-like tensor for llama.cpp: it stays Q4_K.
    """
    if len(shape) < 2 or "ffn_gate_inp" in name or name.endswith("_norm.weight"):
        return "F32"
    if qtype == "BF16":
        return "BF16"
    want = "Q8_0"
    if qtype == "Q4_K_M":
        want = _q4_k_m(name, n_layers, n_expert)
    row = shape[-1]
    block = 256 if want in ("Q4_K", "Q5_K", "Q6_K") else 32
    if row % block:
        want = _FALLBACK[want]
        if want == "Q5_1":
            raise TandemError(f"{name}: Q5_1 fallback (row {row}) is not a format tandem reads")
        if want != "F16" and row % 32:
            want = "F16"
    return want


def _q4_k_m(name: str, n_layers: int, n_expert: int) -> str:
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight":
        return "Q6_K"
    if "attn_v.weight" in name or "attn_kv_b.weight" in name:
        # One such tensor per layer, counted in layer order: i_attention_wv == the layer index.
        return "Q8_0" if n_expert == 8 else "Q6_K" if use_more_bits(layer, n_layers) else "Q4_K"
    if "attn_k.weight" in name and n_expert == 8:
        return "Q8_0"
    if "attn_output.weight" in name and n_expert == 8:
        return "Q5_K"
    if "ffn_down" in name:  # dense, shared and routed: the layer comes from the name
        return "Q6_K" if use_more_bits(layer, n_layers) else "Q4_K"
    return "Q4_K"


def expert_bytes(model: SynthModel) -> int:
    """Bytes of all routed expert tensors (ffn_{gate,up,down}_exps) in the file."""
    return sum(t.nbytes for t in model.tensors if t.name.endswith("_exps.weight"))


def full_model(model: SynthModel) -> SynthModel:
    """The same architecture at full depth (tensor list only), for extrapolated bounds."""
    if model.layers == model.full_layers:
        return model
    return plan(model.arch, None, model.qtype, model.config.get("scale", 1))
