"""Tiny random models of real architectures, written as HF model directories.

Tests, docs and benchmarks build them on the fly (no weights can be downloaded): config.json in the
hub's format, safetensors with hub tensor names (single file or shards + index), a small BPE
tokenizer with a chat template, generation_config.json. Deterministic for a given seed.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

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

# The built-in model `tandem chat` runs when given none (random weights until a trained one ships).
DEMO = dict(DEEPSEEK_VARIANTS["deepseek_v3"], hidden_size=128, num_hidden_layers=4, moe_intermediate_size=64)


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
    spec = DEEPSEEK_VARIANTS[variant] if isinstance(variant, str) else variant
    write_tokenizer(out, vocab_size=VOCAB)
    special = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in special}
    cfg = deepseek_hf_config(spec, VOCAB, ids["<｜begin▁of▁sentence｜>"], ids["<｜end▁of▁sentence｜>"])
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: random_tensor(n, s, gen).to(dtype) for n, s in deepseek_tensor_shapes(cfg).items()}
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


def demo_model_dir() -> Path:
    """The built-in demo model, generated once into the user's cache directory."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem" / "demo-random-v1"
    if not (root / "model.safetensors").exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        write_tiny(tmp, DEMO, seed=1234, dtype=torch.bfloat16)
        if root.exists():  # another process won the race; its copy is identical
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, root)
    return root
