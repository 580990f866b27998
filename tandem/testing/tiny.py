"""Tiny random models of real architectures, written as HF model directories.

Tests, docs and benchmarks build them on the fly (no weights can be downloaded): config.json in the
hub's format, safetensors with hub tensor names (single file or shards + index), a small BPE
tokenizer with a chat template, generation_config.json. Deterministic for a given seed.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tandem.errors import TandemError
from tandem.testing.tiny_tokenizer import write_tokenizer

VOCAB = 512

# DeepSeek variants cover each routing method and attention option the foundation supports.
DEEPSEEK_VARIANTS = {
    # V3/R1: q low-rank, sigmoid + correction bias, 4 groups keep 2, scaled routed sum
    "deepseek_v3": dict(
        model_type="deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.5, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True, first_k_dense_replace=1,
    ),
    # V2: no q low-rank, softmax, group-limited greedy
    "deepseek_v2": dict(
        model_type="deepseek_v2", hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=1.5, scoring_func="softmax",
        topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=False,
        first_k_dense_replace=1,
    ),
    # V2-Lite: plain greedy top-k over softmax, no leading dense layer
    "deepseek_v2_lite": dict(
        model_type="deepseek_v2", hidden_size=48, intermediate_size=80, moe_intermediate_size=20,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, routed_scaling_factor=1.0, scoring_func="softmax",
        topk_method="greedy", norm_topk_prob=False, first_k_dense_replace=0,
    ),
    # Odd sizes everywhere (rope dims must stay even)
    "deepseek_v3_odd": dict(
        model_type="deepseek_v3", hidden_size=57, intermediate_size=71, moe_intermediate_size=13,
        num_hidden_layers=3, num_attention_heads=3, q_lora_rank=23, kv_lora_rank=19,
        qk_nope_head_dim=7, qk_rope_head_dim=6, v_head_dim=9, n_routed_experts=6,
        num_experts_per_tok=3, n_shared_experts=1, routed_scaling_factor=1.7, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=3, topk_group=2, norm_topk_prob=True, first_k_dense_replace=1,
    ),
    # YaRN long-context scaling with mscale / mscale_all_dim, as in the released V3 config
    "deepseek_v3_yarn": dict(
        model_type="deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True, first_k_dense_replace=1,
        max_position_embeddings=4096,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    ),
}

# Qwen-MoE variants: GQA ratios 1/2/4, with and without the shared expert, dense layers from
# mlp_only_layers and decoder_sparse_step, Qwen3's head_dim != hidden/heads, sliding windows.
QWEN_MOE_VARIANTS = {
    # Qwen1.5-MoE layout: MHA, qkv bias, shared expert behind a sigmoid gate, weights not renormalized
    "qwen2_moe": dict(
        model_type="qwen2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
    ),
    # Odd sizes, GQA 2, head_dim given (HF honours it), no shared expert, mlp_only_layers=[1]
    "qwen2_moe_dense_mid": dict(
        model_type="qwen2_moe", hidden_size=54, intermediate_size=41, moe_intermediate_size=13,
        shared_expert_intermediate_size=0, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=3, head_dim=8, num_experts=7, num_experts_per_tok=3, norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    # GQA 4, MoE every 2nd layer, renormalized, transformers 5's sliding window on even early layers
    "qwen2_moe_window": dict(
        model_type="qwen2_moe", hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=2, use_sliding_window=True, sliding_window=20, max_window_layers=2,
    ),
    # Qwen3-30B-A3B layout: q/k norm, head_dim 16 != 64/8, GQA 2, renormalized top-k
    "qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rope_theta=1e6,
    ),
    # Odd sizes, MHA, first layer dense, tied embeddings, weights not renormalized
    "qwen3_moe_odd": dict(
        model_type="qwen3_moe", hidden_size=57, intermediate_size=71, moe_intermediate_size=13,
        num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3, head_dim=10,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0],
        tie_word_embeddings=True, rope_theta=1e6,
    ),
    # GQA 4, attention_bias (q/k/v/o), every layer windowed
    "qwen3_moe_window": dict(
        model_type="qwen3_moe", hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=12,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, attention_bias=True,
        use_sliding_window=True, sliding_window=24, rope_theta=1e6,
    ),
}

# Mixtral variants: top-2 of 8 (and odd counts), GQA ratios 4/2/1, sliding windows shorter than prompts.
MIXTRAL_VARIANTS = {
    "mixtral": dict(
        model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    ),
    "mixtral_window": dict(
        model_type="mixtral", hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=20,
    ),
    # Odd sizes, MHA, explicit head_dim, a window (7) smaller than a cache block
    "mixtral_odd": dict(
        model_type="mixtral", hidden_size=45, intermediate_size=27, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, head_dim=10, num_local_experts=5,
        num_experts_per_tok=3, sliding_window=7,
    ),
}



def deepseek_hf_config(variant: dict, vocab_size: int, bos: int, eos: int) -> dict:
    arch = "DeepseekV3ForCausalLM" if variant["model_type"] == "deepseek_v3" else "DeepseekV2ForCausalLM"
    cfg = dict(
        architectures=[arch], vocab_size=vocab_size, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=bos, eos_token_id=eos, moe_layer_freq=1, attention_bias=False,
        torch_dtype="float32",
    )
    cfg.update(variant)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


def deepseek_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Hub tensor names and shapes of a DeepSeek-V2/V3 checkpoint for config dict c."""
    h, nh = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if c.get("q_lora_rank"):
            shapes[a + "q_a_proj.weight"] = (c["q_lora_rank"], h)
            shapes[a + "q_a_layernorm.weight"] = (c["q_lora_rank"],)
            shapes[a + "q_b_proj.weight"] = (nh * (dn + dr), c["q_lora_rank"])
        else:
            shapes[a + "q_proj.weight"] = (nh * (dn + dr), h)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (c["kv_lora_rank"] + dr, h)
        shapes[a + "kv_a_layernorm.weight"] = (c["kv_lora_rank"],)
        shapes[a + "kv_b_proj.weight"] = (nh * (dn + dv), c["kv_lora_rank"])
        shapes[a + "o_proj.weight"] = (h, nh * dv)
        m = p + "mlp."
        if i >= c.get("first_k_dense_replace", 0):
            e, inter = c["n_routed_experts"], c["moe_intermediate_size"]
            shapes[m + "gate.weight"] = (e, h)
            if c["topk_method"] == "noaux_tc":
                shapes[m + "gate.e_score_correction_bias"] = (e,)
            for x in range(e):
                shapes[m + f"experts.{x}.gate_proj.weight"] = (inter, h)
                shapes[m + f"experts.{x}.up_proj.weight"] = (inter, h)
                shapes[m + f"experts.{x}.down_proj.weight"] = (h, inter)
            shared = inter * c.get("n_shared_experts", 0)
            if shared:
                shapes[m + "shared_experts.gate_proj.weight"] = (shared, h)
                shapes[m + "shared_experts.up_proj.weight"] = (shared, h)
                shapes[m + "shared_experts.down_proj.weight"] = (h, shared)
        else:
            inter = c["intermediate_size"]
            shapes[m + "gate_proj.weight"] = (inter, h)
            shapes[m + "up_proj.weight"] = (inter, h)
            shapes[m + "down_proj.weight"] = (h, inter)
    return shapes


def qwen_moe_hf_config(variant: dict, vocab_size: int, bos: int, eos: int) -> dict:
    arch = "Qwen3MoeForCausalLM" if variant["model_type"] == "qwen3_moe" else "Qwen2MoeForCausalLM"
    cfg = dict(
        architectures=[arch], vocab_size=vocab_size, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=bos, eos_token_id=eos, decoder_sparse_step=1, mlp_only_layers=[],
        use_sliding_window=False, sliding_window=None, torch_dtype="float32",
    )
    cfg.update(variant)
    return cfg


def mixtral_hf_config(variant: dict, vocab_size: int, bos: int, eos: int) -> dict:
    cfg = dict(
        architectures=["MixtralForCausalLM"], vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=2048, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=bos, eos_token_id=eos, sliding_window=None, torch_dtype="float32",
    )
    cfg.update(variant)
    return cfg


def _gqa_shapes(c: dict, i: int, bias: bool, o_bias: bool, qk_norm: bool) -> dict[str, tuple[int, ...]]:
    """Norms and attention of Llama-style layer i (hub names)."""
    h, nh = c["hidden_size"], c["num_attention_heads"]
    nkv, d = c.get("num_key_value_heads") or nh, c.get("head_dim") or h // nh
    p = f"model.layers.{i}."
    a = p + "self_attn."
    shapes = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    shapes.update({a + "q_proj.weight": (nh * d, h), a + "k_proj.weight": (nkv * d, h), a + "v_proj.weight": (nkv * d, h)})
    shapes[a + "o_proj.weight"] = (h, nh * d)
    if bias:
        shapes.update({a + "q_proj.bias": (nh * d,), a + "k_proj.bias": (nkv * d,), a + "v_proj.bias": (nkv * d,)})
    if o_bias:
        shapes[a + "o_proj.bias"] = (h,)
    if qk_norm:
        shapes.update({a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)})
    return shapes


def _mlp_shapes(prefix: str, h: int, inter: int, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, tuple[int, ...]]:
    gate, up, down = names
    return {prefix + gate + ".weight": (inter, h), prefix + up + ".weight": (inter, h), prefix + down + ".weight": (h, inter)}


def _embedding_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, v = c["hidden_size"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def qwen_moe_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Hub tensor names and shapes of a Qwen2-MoE / Qwen3-MoE checkpoint for config dict c."""
    qwen3 = c["model_type"] == "qwen3_moe"
    h, step, dense = c["hidden_size"], c.get("decoder_sparse_step", 1), c.get("mlp_only_layers") or []
    shapes = _embedding_shapes(c)
    for i in range(c["num_hidden_layers"]):
        bias = c.get("attention_bias", False) if qwen3 else c.get("qkv_bias", True)
        shapes.update(_gqa_shapes(c, i, bias, qwen3 and bias, qk_norm=qwen3))
        m = f"model.layers.{i}.mlp."
        if i not in dense and (i + 1) % step == 0:
            shapes[m + "gate.weight"] = (c["num_experts"], h)
            for e in range(c["num_experts"]):
                shapes.update(_mlp_shapes(m + f"experts.{e}.", h, c["moe_intermediate_size"]))
            shared = c.get("shared_expert_intermediate_size", 0)
            if shared:
                shapes.update(_mlp_shapes(m + "shared_expert.", h, shared))
                shapes[m + "shared_expert_gate.weight"] = (1, h)
        else:
            shapes.update(_mlp_shapes(m, h, c["intermediate_size"]))
    return shapes


def mixtral_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Hub tensor names and shapes of a Mixtral checkpoint (w1 = gate, w3 = up, w2 = down)."""
    h = c["hidden_size"]
    shapes = _embedding_shapes(c)
    for i in range(c["num_hidden_layers"]):
        shapes.update(_gqa_shapes(c, i, bias=False, o_bias=False, qk_norm=False))
        m = f"model.layers.{i}.block_sparse_moe."
        shapes[m + "gate.weight"] = (c["num_local_experts"], h)
        for e in range(c["num_local_experts"]):
            shapes.update(_mlp_shapes(m + f"experts.{e}.", h, c["intermediate_size"], ("w1", "w3", "w2")))
    return shapes


# model_type -> (HF config.json builder, hub tensor shapes); a variant dict names its family by model_type.
FAMILIES = {
    "deepseek_v2": (deepseek_hf_config, deepseek_tensor_shapes),
    "deepseek_v3": (deepseek_hf_config, deepseek_tensor_shapes),
    "qwen2_moe": (qwen_moe_hf_config, qwen_moe_tensor_shapes),
    "qwen3_moe": (qwen_moe_hf_config, qwen_moe_tensor_shapes),
    "mixtral": (mixtral_hf_config, mixtral_tensor_shapes),
}
VARIANTS = {**DEEPSEEK_VARIANTS, **QWEN_MOE_VARIANTS, **MIXTRAL_VARIANTS}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Scaled so activations stay O(1) through the layers and logits are peaked enough to compare."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


def write_tiny(out_dir, variant: str | dict = "deepseek_v3", seed: int = 0, dtype=torch.float32, shards: int = 1) -> Path:
    """Write a tiny HF model directory and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = VARIANTS[variant] if isinstance(variant, str) else variant
    if spec.get("model_type") not in FAMILIES:
        raise TandemError(f"variant model_type {spec.get('model_type')!r} is not one of {', '.join(FAMILIES)}")
    hf_config, tensor_shapes = FAMILIES[spec["model_type"]]
    write_tokenizer(out, vocab_size=VOCAB)
    special = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in special}
    cfg = hf_config(spec, VOCAB, ids["<｜begin▁of▁sentence｜>"], ids["<｜end▁of▁sentence｜>"])
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: random_tensor(n, s, gen).to(dtype) for n, s in tensor_shapes(cfg).items()}
    write_safetensors(out, tensors, shards)
    return out


def write_safetensors(out: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
