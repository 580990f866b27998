"""Synthetic models' tensor lists (computed, nothing written) against each architecture's real GGUF."""

import pytest

from tandem.errors import TandemError
from tandem.testing.synth import ARCHS, expert_bytes, plan


def tensors(arch, layers=None, qtype="Q4_K_M", **kw):
    return {t.name: (t.shape, t.format) for t in plan(arch, layers, qtype, **kw).tensors}


def test_deepseek_v3_full_q4_k_m():
    m = plan("deepseek-v3")
    t = tensors("deepseek-v3")
    # 3 top-level + 3 dense layers x 13 + 58 MoE layers x 18
    assert len(m.tensors) == 3 + 3 * 13 + 58 * 18 and (m.dense_layers, m.moe_layers) == (3, 58)
    assert t["token_embd.weight"] == ((129280, 7168), "Q4_K")
    assert t["output.weight"] == ((129280, 7168), "Q6_K")
    assert t["blk.0.ffn_down.weight"] == ((7168, 18432), "Q6_K")
    assert t["blk.3.ffn_gate_exps.weight"] == ((256, 2048, 7168), "Q4_K")
    assert t["blk.3.ffn_gate_inp.weight"] == ((256, 7168), "F32")
    assert t["blk.3.exp_probs_b.bias"] == ((256,), "F32")
    assert t["blk.3.ffn_down_shexp.weight"] == ((7168, 2048), "Q6_K")
    assert t["blk.0.attn_q_b.weight"] == ((128 * 192, 1536), "Q4_K")
    assert t["blk.0.attn_kv_a_mqa.weight"] == ((576, 7168), "Q4_K")
    assert t["blk.0.attn_k_b.weight"] == ((128, 512, 128), "Q5_0")  # rows of 128: Q4_K falls back
    assert t["blk.0.attn_v_b.weight"] == ((128, 128, 512), "Q4_K")  # not attn_v-like for llama.cpp
    assert t["blk.0.attn_q_a_norm.weight"] == ((1536,), "F32")
    # use_more_bits(i, 61): i < 7, i >= 53, (i - 7) % 3 == 2
    downs = {i: t[f"blk.{i}.ffn_down_exps.weight"][1] for i in range(3, 61)}
    assert downs[3] == downs[6] == downs[9] == downs[12] == downs[53] == downs[60] == "Q6_K"
    assert downs[7] == downs[8] == downs[10] == downs[52] == "Q4_K"
    assert sum(f == "Q6_K" for f in downs.values()) == 27


def test_v2_lite_fallbacks_for_rows_of_1408():
    t = tensors("deepseek-v2-lite")
    assert len(t) == 3 + 11 + 26 * 15  # one attn_q (no q low-rank), no correction bias
    assert t["blk.0.attn_q.weight"] == ((16 * 192, 2048), "Q4_K")
    assert t["blk.0.ffn_down.weight"] == ((2048, 10944), "Q8_0")  # Q6_K -> Q8_0 (10944 % 256)
    assert t["blk.1.ffn_down_exps.weight"] == ((64, 2048, 1408), "Q8_0")  # more bits: Q6_K -> Q8_0
    assert t["blk.4.ffn_down_exps.weight"] == ((64, 2048, 1408), "Q5_0")  # Q4_K -> Q5_0
    assert t["blk.5.ffn_down_exps.weight"][1] == "Q8_0"
    assert t["blk.4.ffn_gate_exps.weight"] == ((64, 1408, 2048), "Q4_K")
    assert t["blk.1.ffn_down_shexp.weight"] == ((2048, 2816), "Q6_K")
    assert "blk.1.exp_probs_b.bias" not in t


def test_qwen3_and_mixtral_attention_rules():
    q = tensors("qwen3-30b-a3b")
    assert q["blk.0.attn_q.weight"] == ((4096, 2048), "Q4_K")
    assert q["blk.0.attn_k.weight"] == ((512, 2048), "Q4_K")
    assert q["blk.0.attn_v.weight"] == ((512, 2048), "Q6_K")  # 48 // 8 = 6: layers 0-5 more bits
    assert q["blk.6.attn_v.weight"][1] == "Q4_K" and q["blk.8.attn_v.weight"][1] == "Q6_K"
    assert q["blk.0.attn_q_norm.weight"] == ((128,), "F32")
    assert q["blk.0.ffn_down_exps.weight"] == ((128, 2048, 768), "Q6_K")
    assert tensors("qwen3-235b-a22b")["blk.93.ffn_up_exps.weight"] == ((128, 1536, 4096), "Q4_K")
    m = tensors("mixtral-8x7b")  # 8 experts: attn_v / attn_k Q8_0, attn_output Q5_K
    assert m["blk.9.attn_v.weight"] == ((1024, 4096), "Q8_0") and m["blk.9.attn_k.weight"][1] == "Q8_0"
    assert m["blk.9.attn_output.weight"] == ((4096, 4096), "Q5_K")
    assert m["blk.0.ffn_down_exps.weight"] == ((8, 4096, 14336), "Q6_K")
    assert m["blk.4.ffn_down_exps.weight"][1] == "Q4_K"
    assert m["output.weight"] == ((32000, 4096), "Q6_K")


@pytest.mark.parametrize("arch, gb", [("deepseek-v3", 404), ("deepseek-v2-lite", 10.4), ("qwen3-30b-a3b", 18.6),
                                      ("qwen3-235b-a22b", 142)])
def test_total_size_matches_the_published_q4_k_m_files(arch, gb):
    """Sizes of llama.cpp's Q4_K_M files of these models as the hub lists them (GB = 1e9 bytes)."""
    assert plan(arch).total_bytes / 1e9 == pytest.approx(gb, rel=0.015)


def test_q8_0_and_bf16_keep_norms_and_routers_f32():
    for qtype, fmt in (("Q8_0", "Q8_0"), ("BF16", "BF16")):
        t = tensors("deepseek-v3", 4, qtype)
        assert t["blk.3.ffn_down_exps.weight"][1] == fmt and t["output.weight"][1] == fmt
        assert t["blk.3.ffn_gate_inp.weight"][1] == t["blk.3.attn_norm.weight"][1] == "F32"


def test_truncation_keeps_dense_layers_and_full_depth_mix():
    m = plan("deepseek-v3", 8)
    assert (m.layers, m.dense_layers, m.moe_layers) == (8, 3, 5)
    full, trunc = tensors("deepseek-v3", 8), tensors("deepseek-v3", 8, mix_depth="truncated")
    assert full["blk.4.ffn_down_exps.weight"][1] == "Q6_K"  # layer 4 of 61: first eighth
    assert trunc["blk.4.ffn_down_exps.weight"][1] == "Q4_K"  # layer 4 of an 8-layer model
    assert (plan("deepseek-v3", 2).dense_layers, plan("deepseek-v2-lite", 2).moe_layers) == (1, 1)
    assert expert_bytes(plan("deepseek-v3", 5)) - expert_bytes(plan("deepseek-v3", 4)) == sum(
        t.nbytes for t in plan("deepseek-v3", 5).tensors if t.name.startswith("blk.4.") and "_exps" in t.name)


def test_bad_requests_are_user_errors():
    for kw in ({"arch": "nope"}, {"arch": "deepseek-v3", "layers": 62}, {"arch": "deepseek-v3", "layers": 1},
               {"arch": "mixtral-8x7b", "qtype": "Q4_0"}, {"arch": "mixtral-8x7b", "scale": 0}):
        with pytest.raises(TandemError):
            plan(**kw)
    assert set(ARCHS) == {"deepseek-v3", "deepseek-v2-lite", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b"}


def test_scaled_debug_variant_keeps_the_mix_classes():
    t = tensors("deepseek-v2-lite", 2, scale=8)
    shape, fmt = t["blk.1.ffn_down_exps.weight"]
    assert shape[-1] % 32 == 0 and shape[-1] % 256 and fmt == "Q8_0"
    assert t["blk.0.attn_k_b.weight"][1] == "Q5_0"


@pytest.mark.parametrize("arch", ARCHS)
def test_scaled_special_ids_stay_in_the_vocabulary(arch):
    # --scale 48 on deepseek-v2-lite put bos / eos at negative ids (struct.error writing the file).
    full = plan(arch, 2).config
    for scale in (2, 8, 48, 64, 1000):
        c = plan(arch, 2, scale=scale).config
        assert 0 <= c["bos"] < c["vocab_size"] and 0 <= c["eos"] < c["vocab_size"], (scale, c["bos"], c["eos"])
        assert (c["bos"] == c["eos"]) == (full["bos"] == full["eos"])
