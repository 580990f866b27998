"""Full-size models as tensor lists, computed rather than written: names, shapes and quant types.

For planning and roofline tests on models no test machine can hold: DeepSeek-V3's config.json
values and the tensors of its GGUF as llama.cpp's converter names them (merged [E, ...] experts,
kv_b split into attn_k_b + attn_v_b, no multi-token-prediction layer), each with the quant type
llama-quantize would give it (tiny_gguf's `_storage`, e.g. Q4_K_M: Q4_K, Q6_K for output.weight
and the "more bits" ffn_down / attn_v_b, Q5_0 where rows are not multiples of 256, F32 norms and
routers). Shapes are in torch order (outermost first), as GGUFCheckpoint reports them.
"""

import math

from tandem.testing.tiny_gguf import _storage
from tandem.weights.quant import FORMATS

# deepseek-ai/DeepSeek-V3 config.json (R1 has the same shapes).
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=2.5,
    scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
    first_k_dense_replace=3, moe_layer_freq=1, num_nextn_predict_layers=1, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                      mscale=1.0, mscale_all_dim=1.0),
    max_position_embeddings=163840, tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16",
)


def deepseek_gguf_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, torch-order shape) of a DeepSeek-V2/V3 GGUF for config dict c, in file order."""
    h, nh, v = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    dn, dr, dv, rank = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    e, moe_i, q_rank = c["n_routed_experts"], c["moe_intermediate_size"], c.get("q_lora_rank")
    out = [("token_embd.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (h,)))
        if q_rank:
            out += [(b + "attn_q_a.weight", (q_rank, h)), (b + "attn_q_a_norm.weight", (q_rank,)),
                    (b + "attn_q_b.weight", (nh * (dn + dr), q_rank))]
        else:
            out.append((b + "attn_q.weight", (nh * (dn + dr), h)))
        out += [(b + "attn_kv_a_mqa.weight", (rank + dr, h)), (b + "attn_kv_a_norm.weight", (rank,)),
                (b + "attn_k_b.weight", (nh, rank, dn)), (b + "attn_v_b.weight", (nh, dv, rank)),
                (b + "attn_output.weight", (h, nh * dv)), (b + "ffn_norm.weight", (h,))]
        if i < c["first_k_dense_replace"]:
            inter = c["intermediate_size"]
            out += [(b + "ffn_gate.weight", (inter, h)), (b + "ffn_up.weight", (inter, h)), (b + "ffn_down.weight", (h, inter))]
            continue
        out.append((b + "ffn_gate_inp.weight", (e, h)))
        if c.get("topk_method") == "noaux_tc":
            out.append((b + "exp_probs_b.bias", (e,)))
        out += [(b + "ffn_down_exps.weight", (e, h, moe_i)), (b + "ffn_gate_exps.weight", (e, moe_i, h)),
                (b + "ffn_up_exps.weight", (e, moe_i, h))]
        shared = moe_i * c.get("n_shared_experts", 0)
        if shared:
            out += [(b + "ffn_gate_shexp.weight", (shared, h)), (b + "ffn_up_shexp.weight", (shared, h)),
                    (b + "ffn_down_shexp.weight", (h, shared))]
    out += [("output_norm.weight", (h,)), ("output.weight", (v, h))]
    return out


def gguf_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes of a tensor stored in `qtype` (rows of whole blocks)."""
    fmt = FORMATS[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // fmt.block_size) * fmt.block_bytes


def deepseek_gguf_tensors(c: dict = DEEPSEEK_V3, qtype: str = "Q4_K_M") -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, quant type, bytes) of every tensor of the GGUF llama.cpp would write for c."""
    n_layers = c["num_hidden_layers"]
    out = []
    for name, shape in deepseek_gguf_shapes(c):
        fmt = _storage(name, shape, qtype, n_layers)
        out.append((name, shape, fmt, gguf_nbytes(shape, fmt)))
    return out
