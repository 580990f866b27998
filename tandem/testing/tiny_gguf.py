"""GGUF versions of the tiny models, written the way llama.cpp's tools write real ones.

`write_gguf(hf_dir, path, qtype)` converts a tiny HF directory (testing/tiny.py) as
convert_hf_to_gguf.py does: metadata keys, GGUF tensor names, merged [E, ...] expert tensors, the
BPE tokenizer as tokenizer.ggml.* keys. DeepSeek (`deepseek2`): kv_b split into attn_k_b
(transposed) + attn_v_b as newer converters write it, or kept whole as older ones did. Qwen-MoE
(`qwen2moe`, `qwen3moe`) as is; Mixtral (`llama`) with q/k rows permuted for llama.cpp's rope.
Then it quantizes like llama-quantize, with `tandem.weights.quant` (round-to-nearest: the same
formats as llama.cpp, not the same bytes).

qtype: F32, F16, BF16, Q8_0, or Q4_K_M: Q4_K for most 2-D weights, Q6_K for output.weight and for
ffn_down* / attn_v_b in llama.cpp's "more bits" layers; where a row is not a multiple of 256, Q4_K
falls back to Q5_0 and Q6_K to Q8_0, and to F16 where it is not a multiple of 32. Norms, biases
and the router (ffn_gate_inp) stay F32 in every qtype, as llama.cpp keeps them.
`GGUF_VARIANTS` are DeepSeek variants with hidden size 256, so that K-quants apply.
"""

import json
from pathlib import Path

import numpy as np
import torch
from gguf import (
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
)

from tandem.errors import TandemError
from tandem.testing.tiny import DEEPSEEK_VARIANTS, VARIANTS, write_tiny
from tandem.weights.checkpoint import Checkpoint
from tandem.weights.quant import format_of, quantize

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q4_K_M")
FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
              "Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q6_K": LlamaFileType.MOSTLY_Q6_K,
              "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M}
# K-quant -> the 32-element format llama-quantize falls back to for rows that 256 does not divide.
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}

GGUF_VARIANTS = {
    # V3-style (q low-rank, sigmoid + bias, groups) with rows of 256 for K-quants.
    "deepseek_v3_q": dict(
        DEEPSEEK_VARIANTS["deepseek_v3"], hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=3, q_lora_rank=256, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    ),
    # V2-style (no q low-rank, softmax, group-limited greedy).
    "deepseek_v2_q": dict(
        DEEPSEEK_VARIANTS["deepseek_v2"], hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=3, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2,
    ),
}

_ATTN = {"q_proj": "attn_q", "q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b",
         "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm", "kv_b_proj": "attn_kv_b",
         "o_proj": "attn_output"}


def write_tiny_gguf(out_dir, variant: str | dict = "deepseek_v3_q", qtype: str = "Q4_K_M", seed: int = 0, **kw) -> tuple:
    """Write a tiny HF model (out_dir/hf) and its GGUF (out_dir/model-QTYPE.gguf); returns (hf_dir, gguf_path).

    `variant` names one of GGUF_VARIANTS or testing.tiny.VARIANTS, or is such a dict itself.
    """
    out = Path(out_dir)
    spec = variant if isinstance(variant, dict) else GGUF_VARIANTS.get(variant) or VARIANTS[variant]
    hf_dir = write_tiny(out / "hf", spec, seed=seed)
    return hf_dir, write_gguf(hf_dir, out / f"model-{qtype}.gguf", qtype, **kw)


def write_gguf(
    hf_dir, path, qtype: str = "F32", split_kv_b: bool = True, split_max_tensors: int = 0, drop: tuple = (),
    metadata: dict | None = None,
) -> Path:
    """Convert a tiny DeepSeek HF directory to GGUF; returns the path of the (first) file written.

    split_max_tensors > 0 writes a split model (llama.cpp's NAME-0000i-of-0000N.gguf parts);
    `drop` leaves the named GGUF tensors out (to test incomplete files); `metadata` adds or replaces
    keys (bool, int as int32, float as float32, str), e.g. {"general.sampling.temp": 0.6}.
    """
    if qtype not in QTYPES:
        raise TandemError(f"unknown tiny GGUF qtype {qtype!r}; choose one of {', '.join(QTYPES)}")
    hf_dir, path = Path(hf_dir), Path(path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    deepseek = cfg["model_type"].startswith("deepseek")
    arch = "deepseek2" if deepseek else {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama"}[cfg["model_type"]]
    writer = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    (_add_config if deepseek else _add_gqa_config)(writer, cfg, split_kv_b)
    writer.add_file_type(FILE_TYPES[qtype])
    if qtype in ("Q8_0", "Q6_K", "Q4_K_M"):
        writer.add_quantization_version(2)
    _add_tokenizer(writer, hf_dir)
    for key, value in (metadata or {}).items():
        writer.kv_data[0].pop(key, None)  # replace a key the converter wrote
        kind = next(t for c, t in _VALUE_TYPES if isinstance(value, c))
        writer.add_key_value(key, value, kind)
    n_layers = cfg["num_hidden_layers"]
    with Checkpoint.open(hf_dir) as ckpt:  # single file or shards
        hf = {name: ckpt.get(name) for name in ckpt.names()}
    for name, tensor in _gguf_tensors(cfg, hf, split_kv_b) if deepseek else _gqa_tensors(cfg, hf):
        if name in drop:
            continue
        x = tensor.float().numpy()
        fmt = _storage(name, x.shape, qtype, n_layers)
        if fmt == "F32":
            writer.add_tensor(name, x)
        elif fmt == "F16":
            writer.add_tensor(name, x.astype(np.float16))
        else:  # BF16 and block formats travel as raw bytes
            writer.add_tensor(name, quantize(x, fmt), raw_dtype=GGMLQuantizationType(format_of(fmt).ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(path)[0]


# Python type -> GGUF value type of write_gguf's extra metadata (bool before int: a bool is an int).
_VALUE_TYPES = ((bool, GGUFValueType.BOOL), (int, GGUFValueType.INT32), (float, GGUFValueType.FLOAT32),
                (str, GGUFValueType.STRING))


def _add_config(w: GGUFWriter, c: dict, split_kv_b: bool) -> None:
    """The deepseek2.* keys, as DeepseekV2Model.set_gguf_parameters writes them."""
    w.add_name("tiny " + c["model_type"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1 if split_kv_b else c["num_attention_heads"])  # newer converters: MLA as MQA
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    if c.get("n_group") is not None:
        w.add_expert_group_count(c["n_group"])
        w.add_expert_group_used_count(c["topk_group"])
    w.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX if c["scoring_func"] == "softmax" else ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(c["first_k_dense_replace"])
    w.add_vocab_size(c["vocab_size"])
    if c.get("q_lora_rank"):
        w.add_q_lora_rank(c["q_lora_rank"])
    rank, nope, rope, v = c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    w.add_kv_lora_rank(rank)
    if split_kv_b:
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
    else:
        w.add_key_length(nope + rope)
        w.add_value_length(v)
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    if c["norm_topk_prob"]:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    scaling = c.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if key in scaling:
                add(scaling[key])
        if scaling.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])


def _add_gqa_config(w: GGUFWriter, c: dict, _split_kv_b: bool) -> None:
    """Qwen2MoeModel's / LlamaModel's keys (TextModel.set_gguf_parameters and their additions)."""
    mixtral = c["model_type"] == "mixtral"
    heads = c["num_attention_heads"]
    w.add_name("tiny " + c["model_type"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c.get("num_key_value_heads") or heads)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["num_local_experts"] if mixtral else c["num_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    if c.get("head_dim"):
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    if mixtral:
        w.add_vocab_size(c["vocab_size"])
        w.add_rope_dimension_count(c.get("head_dim") or c["hidden_size"] // heads)
    else:
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        if c.get("shared_expert_intermediate_size") is not None:
            w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])


def _add_tokenizer(w: GGUFWriter, hf_dir: Path) -> None:
    """tokenizer.ggml.* as _set_vocab_gpt2 + gguf.SpecialVocab write them."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    types = {i: TokenType.NORMAL for i in by_id}
    for added in tok["added_tokens"]:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # the tiny tokenizer splits with GPT-2's byte-level regex
    w.add_token_list(tokens)
    w.add_token_types([int(types.get(i, TokenType.UNUSED)) for i in range(n)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])

    def content(v):
        return v["content"] if isinstance(v, dict) else v

    w.add_bos_token_id(ids[content(config["bos_token"])])
    w.add_eos_token_id(ids[content(config["eos_token"])])
    if config.get("pad_token"):
        w.add_pad_token_id(ids[content(config["pad_token"])])
    w.add_add_bos_token(bool(config.get("add_bos_token", False)))
    w.add_add_eos_token(bool(config.get("add_eos_token", False)))
    w.add_chat_template(config["chat_template"])


def _gguf_tensors(c: dict, hf: dict[str, torch.Tensor], split_kv_b: bool):
    """(GGUF name, tensor) in HF order, renamed and merged as the converter does."""
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in hf.items():
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            yield "token_embd.weight", t
        elif name == "model.norm.weight":
            yield "output_norm.weight", t
        elif name == "lm_head.weight":
            yield "output.weight", t
        elif parts[3] in ("input_layernorm", "post_attention_layernorm"):
            yield f"blk.{parts[2]}.{'attn_norm' if parts[3] == 'input_layernorm' else 'ffn_norm'}.weight", t
        elif parts[3] == "self_attn" and parts[4] == "kv_b_proj" and split_kv_b:
            heads, nope = c["num_attention_heads"], c["qk_nope_head_dim"]
            k_b, v_b = t.view(heads, nope + c["v_head_dim"], t.shape[-1]).split([nope, c["v_head_dim"]], dim=1)
            yield f"blk.{parts[2]}.attn_k_b.weight", k_b.transpose(1, 2).contiguous()
            yield f"blk.{parts[2]}.attn_v_b.weight", v_b.contiguous()
        elif parts[3] == "self_attn":
            yield f"blk.{parts[2]}.{_ATTN[parts[4]]}.weight", t
        elif parts[4] == "gate":
            yield f"blk.{parts[2]}.{'ffn_gate_inp.weight' if parts[5] == 'weight' else 'exp_probs_b.bias'}", t
        elif parts[4] == "experts":
            layer, e, proj = int(parts[2]), int(parts[5]), parts[6].removesuffix("_proj")
            experts.setdefault((layer, proj), {})[e] = t
            if all(len(experts.get((layer, p), {})) == c["n_routed_experts"] for p in ("gate", "up", "down")):
                for p in ("down", "gate", "up"):  # the converter's merge order
                    merged = experts.pop((layer, p))
                    yield f"blk.{layer}.ffn_{p}_exps.weight", torch.stack([merged[i] for i in range(len(merged))])
        elif parts[4] == "shared_experts":
            yield f"blk.{parts[2]}.ffn_{parts[5].removesuffix('_proj')}_shexp.weight", t
        else:  # dense mlp
            yield f"blk.{parts[2]}.ffn_{parts[4].removesuffix('_proj')}.weight", t


_GQA_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
_MIXTRAL_EXPERT = {"w1": "gate", "w3": "up", "w2": "down"}


def _gqa_tensors(c: dict, hf: dict[str, torch.Tensor]):
    """(GGUF name, tensor) for Qwen-MoE and Mixtral, renamed, merged (and permuted) as the converter does."""
    mixtral = c["model_type"] == "mixtral"
    n_experts = c["num_local_experts"] if mixtral else c["num_experts"]
    heads = {"q_proj": c["num_attention_heads"], "k_proj": c.get("num_key_value_heads") or c["num_attention_heads"]}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in hf.items():
        if name in top:
            yield top[name], t
            continue
        parts = name.split(".")
        layer, kind = int(parts[2]), parts[3]
        if kind in ("input_layernorm", "post_attention_layernorm"):
            yield f"blk.{layer}.{'attn_norm' if kind == 'input_layernorm' else 'ffn_norm'}.weight", t
        elif kind == "self_attn":
            if mixtral and parts[4] in heads:  # LlamaModel.permute: halves -> adjacent pairs per head
                n = heads[parts[4]]
                t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
            yield f"blk.{layer}.{_GQA_ATTN[parts[4]]}.{parts[5]}", t
        elif parts[4] == "gate":
            yield f"blk.{layer}.ffn_gate_inp.weight", t
        elif parts[4] == "shared_expert_gate":
            yield f"blk.{layer}.ffn_gate_inp_shexp.weight", t
        elif parts[4] == "shared_expert":
            yield f"blk.{layer}.ffn_{parts[5].removesuffix('_proj')}_shexp.weight", t
        elif parts[4] == "experts":
            proj = _MIXTRAL_EXPERT[parts[6]] if mixtral else parts[6].removesuffix("_proj")
            experts.setdefault((layer, proj), {})[int(parts[5])] = t
            if all(len(experts.get((layer, p), {})) == n_experts for p in ("gate", "up", "down")):
                for p in ("gate", "down", "up") if mixtral else ("down", "gate", "up"):
                    merged = experts.pop((layer, p))
                    yield f"blk.{layer}.ffn_{p}_exps.weight", torch.stack([merged[i] for i in range(n_experts)])
        else:  # dense mlp
            yield f"blk.{layer}.ffn_{parts[4].removesuffix('_proj')}.weight", t


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _storage(name: str, shape: tuple[int, ...], qtype: str, n_layers: int) -> str:
    """The format one tensor is stored in for a file of `qtype`."""
    if len(shape) == 1 or "ffn_gate_inp" in name or qtype == "F32":
        return "F32"
    if qtype in ("F16", "BF16"):
        return qtype
    row = shape[-1]
    if qtype == "Q8_0":
        return "Q8_0" if row % 32 == 0 else "F16"
    if qtype == "Q6_K":
        return "Q6_K" if row % 256 == 0 else "Q8_0" if row % 32 == 0 else "F16"
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    more_bits = ("ffn_down" in name or "attn_v" in name) and _more_bits(layer, n_layers)
    want = "Q6_K" if name == "output.weight" or more_bits else "Q4_K"
    if row % 256:
        want = _FALLBACK[want]
    return want if row % 32 == 0 else "F16"
