"""DeepSeek models from GGUF files (written like llama.cpp's converter and quantizer would) against
the same models from safetensors: config, logits, tokenizer, split files, --config-dir, errors.

Quantized files are held to the safetensors model loaded with the *dequantized* weights (decoded by
gguf-py, llama.cpp's own reference code): logits must agree to 1e-5. The gap to the original
weights (the quantization error) is bounded per format and printed.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tandem.errors import TandemError
from tandem.layers.block_experts import BlockExperts
from tandem.layers.moe import TorchExperts
from tandem.models.mixtral import MixtralConfig
from tandem.runtime.llm import LLM
from tandem.runtime.loader import load_model, open_model_files
from tandem.runtime.tokenizer import Tokenizer
from tandem.runtime.tokenizer_gguf import tokenizer_from_gguf
from tandem.testing.tiny import QWEN_MOE_VARIANTS
from tandem.testing.tiny_gguf import write_gguf, write_tiny_gguf
from tandem.weights.gguf import GGUFCheckpoint
from tests.conftest import Stepper, rel_err

BOUND = 1e-5
# Quantization error bounds, measured on these tiny random models with tandem's quantizers:
# relative RMS error of all weights, and max relative logit gap (routing flips make it jumpy).
WEIGHT_GAP = {"F16": 3e-4, "BF16": 2.5e-3, "Q8_0": 8e-3, "Q4_K_M": 0.1}
LOGIT_GAP = {"F16": 3e-3, "BF16": 3e-2, "Q8_0": 0.1, "Q4_K_M": 1.0}


def prompt(n: int = 32, seed: int = 3) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def logits(model) -> torch.Tensor:
    return Stepper(model).feed(prompt())


def load(path, **kw):
    return load_model(path, torch.float32, progress=False, **kw)


# --- float32 files: exactly the safetensors model ---


@pytest.mark.parametrize(
    "variant, split_kv_b",
    [("deepseek_v3", True), ("deepseek_v2", False), ("deepseek_v2_lite", True), ("deepseek_v3_odd", False),
     ("deepseek_v3_yarn", True)],
)
def test_f32_gguf_equals_safetensors(tmp_path, variant, split_kv_b):
    hf_dir, path = write_tiny_gguf(tmp_path, variant, "F32", seed=7, split_kv_b=split_kv_b)
    ours, ref = load(path), load(hf_dir)
    assert ours.cfg == ref.cfg  # metadata -> the same config as config.json, yarn and routing included
    assert rel_err(logits(ours), logits(ref)) <= BOUND


# --- Qwen-MoE and Mixtral: llama.cpp's semantics (no sliding window, its top-k norm) ---


@pytest.mark.parametrize(
    "variant",
    ["qwen2_moe", "qwen2_moe_dense_mid", "qwen3_moe", dict(QWEN_MOE_VARIANTS["qwen3_moe_odd"], norm_topk_prob=True),
     "mixtral"],
    ids=["qwen2_moe", "qwen2_moe_dense_mid", "qwen3_moe", "qwen3_moe_odd_tied", "mixtral"],
)
def test_gqa_families_f32_gguf_equal_safetensors(tmp_path, variant):
    hf_dir, path = write_tiny_gguf(tmp_path, variant, "F32", seed=7)
    ours, ref = load(path), load(hf_dir)
    # GGUF has no sliding-window keys for these families; without a window, layer_types mean nothing.
    same = {"layer_types": ours.cfg.layer_types} if hasattr(ref.cfg, "layer_types") else {}
    assert ours.cfg == dataclasses.replace(ref.cfg, **same)
    assert rel_err(logits(ours), logits(ref)) <= BOUND  # Mixtral: q/k rows permuted back


def test_config_dir_supplies_what_gguf_metadata_cannot(tmp_path):
    # A sliding window (like Qwen3 without renormalized top-k) exists only in config.json.
    hf_dir, path = write_tiny_gguf(tmp_path, "mixtral_odd", "F32", seed=7)
    ref = logits(load(hf_dir))
    assert rel_err(logits(load(path, config_dir=hf_dir)), ref) <= BOUND
    assert rel_err(logits(load(path)), ref) > 1e-3  # llama.cpp's reading: no window


def test_dense_llama_gguf_is_refused():
    with pytest.raises(TandemError, match="dense Llama-architecture model"):
        MixtralConfig.from_gguf({"general.architecture": "llama", "llama.block_count": 2})


# --- quantized files: the dequantized weights exactly, the original ones within the format's error ---

HF_ATTN = {"attn_q": "q_proj", "attn_q_a": "q_a_proj", "attn_q_a_norm": "q_a_layernorm", "attn_q_b": "q_b_proj",
           "attn_kv_a_mqa": "kv_a_proj_with_mqa", "attn_kv_a_norm": "kv_a_layernorm", "attn_kv_b": "kv_b_proj",
           "attn_output": "o_proj"}


def hf_name_tensors(name: str, x: torch.Tensor, halves: dict) -> dict[str, torch.Tensor]:
    """GGUF tensor -> HF hub tensor(s), written independently of the model's renamer."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return {top[name]: x}
    _, layer, kind, _ = name.split(".")
    p = f"model.layers.{layer}."
    if kind in ("attn_k_b", "attn_v_b"):  # llama.cpp splits kv_b per head and stores k_b transposed
        halves.setdefault(layer, {})[kind] = x
        if len(halves[layer]) < 2:
            return {}
        pair = halves.pop(layer)
        k_b, v_b = pair["attn_k_b"].transpose(1, 2), pair["attn_v_b"]  # [nh, dn, c], [nh, dv, c]
        return {p + "self_attn.kv_b_proj.weight": torch.cat([k_b, v_b], dim=1).reshape(-1, k_b.shape[-1])}
    if kind in HF_ATTN:
        return {p + f"self_attn.{HF_ATTN[kind]}.weight": x}
    if kind in ("attn_norm", "ffn_norm"):
        return {p + ("input_layernorm" if kind == "attn_norm" else "post_attention_layernorm") + ".weight": x}
    if kind == "ffn_gate_inp":
        return {p + "mlp.gate.weight": x}
    if kind == "exp_probs_b":
        return {p + "mlp.gate.e_score_correction_bias": x}
    proj = kind.split("_")[1]
    if kind.endswith("_exps"):
        return {p + f"mlp.experts.{e}.{proj}_proj.weight": x[e] for e in range(x.shape[0])}
    if kind.endswith("_shexp"):
        return {p + f"mlp.shared_experts.{proj}_proj.weight": x}
    return {p + f"mlp.{proj}_proj.weight": x}


def dequantized_hf_dir(path, hf_dir, out):
    """An HF directory holding the GGUF's weights as gguf-py dequantizes them (float32 safetensors)."""
    shutil.copytree(hf_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors, halves = {}, {}
    for t in gguf.GGUFReader(path).tensors:
        x = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        tensors.update(hf_name_tensors(t.name, x, halves))
    save_file(tensors, out / "model.safetensors")
    return out


def weight_gap(path, original) -> float:
    """Relative RMS difference of all weights: GGUF (dequantized) vs the F32 GGUF of the same model."""
    ref = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(original).tensors}
    num = den = 0.0
    for t in gguf.GGUFReader(path).tensors:
        diff = gguf.quants.dequantize(t.data, t.tensor_type) - ref[t.name]
        num, den = num + float((diff**2).sum()), den + float((ref[t.name] ** 2).sum())
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def quant_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for variant in ("deepseek_v3_q", "deepseek_v2_q"):
        hf_dir, f32 = write_tiny_gguf(root / variant, variant, "F32", seed=11)
        out[variant] = (hf_dir, f32, logits(load(hf_dir)))
    return out


@pytest.mark.parametrize(
    "variant, qtype",
    [("deepseek_v3_q", "F16"), ("deepseek_v3_q", "BF16"), ("deepseek_v3_q", "Q8_0"), ("deepseek_v3_q", "Q4_K_M"),
     ("deepseek_v2_q", "Q4_K_M")],
)
def test_quantized_gguf_equals_its_dequantized_weights(quant_models, tmp_path, variant, qtype):
    hf_dir, f32, original = quant_models[variant]
    path = write_gguf(hf_dir, tmp_path / f"m-{qtype}.gguf", qtype)
    ours = load(path)
    reference = load(dequantized_hf_dir(path, hf_dir, tmp_path / "dequantized"))
    got = logits(ours)
    assert rel_err(got, logits(reference)) <= BOUND
    moe = [layer.ffn.experts for layer in ours.layers if hasattr(layer.ffn, "experts")]
    quantized = qtype in ("Q8_0", "Q4_K_M")
    assert moe and all(isinstance(e, BlockExperts if quantized else TorchExperts) for e in moe)
    gaps = weight_gap(path, f32), rel_err(got, original)
    print(f"{variant} {qtype}: weight gap {gaps[0]:.2e}, logit gap {gaps[1]:.2e}")
    assert gaps[0] <= WEIGHT_GAP[qtype] and gaps[1] <= LOGIT_GAP[qtype]


def test_quantized_experts_stay_in_the_file_blocks(quant_models, tmp_path):
    hf_dir, _, _ = quant_models["deepseek_v3_q"]
    path = write_gguf(hf_dir, tmp_path / "m.gguf", "Q4_K_M")
    model = load(path)
    assert not [n for n, _ in model.named_parameters() if ".experts." in n]  # no float copy of any expert
    with GGUFCheckpoint.open(path) as ck:
        exps = {n: ck.nbytes(n) for n in ck.names() if "_exps." in n}
        kinds = {ck.qtype(n) for n in exps}
    backends = [layer.ffn.experts for layer in model.layers if isinstance(layer.ffn.experts if hasattr(layer.ffn, "experts") else None, BlockExperts)]
    assert len(backends) == 2 and sum(b.nbytes for b in backends) == sum(exps.values())
    assert kinds == {"Q4_K", "Q6_K"}  # ffn_down_exps of a "more bits" layer is Q6_K


def test_split_gguf_loads_like_the_single_file(quant_models, tmp_path):
    hf_dir, f32, _ = quant_models["deepseek_v2_q"]
    (tmp_path / "split").mkdir()
    first = write_gguf(hf_dir, tmp_path / "split" / "m.gguf", "F32", split_max_tensors=10)
    assert first.name.endswith("-00001-of-00005.gguf")
    assert torch.equal(logits(load(tmp_path / "split" / "m-00003-of-00005.gguf")), logits(load(f32)))


# --- tokenizer, config-dir, the CLI ---


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    """A tiny V3 model as an HF directory and as an F32 GGUF (with its tokenizer in the metadata)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("f32"), "deepseek_v3", "F32", seed=5)


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n: int) -> list[int]:\n    return [0, 1][:n]  # tabs\tand  spaces",
    "Größe, Straße — 你好，世界！🙂 Привет ×3 1234567",
    "<｜User｜>hi<｜Assistant｜><think>hmm</think>ok<｜end▁of▁sentence｜>",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


def test_gguf_tokenizer_behaves_like_the_hf_one(f32_model):
    hf_dir, path = f32_model
    hf = Tokenizer.from_dir(hf_dir)
    with open_model_files(path) as files:
        ours = files.tokenizer()
    assert ours.vocab_size == hf.vocab_size and ours.bos_id == hf.bos_id and ours.eos_ids == hf.eos_ids
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.encode(text) == ids and ours.encode(text, add_special_tokens=False) == hf.encode(text, False)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT)
    assert ours.encode_chat(CHAT) == hf.encode_chat(CHAT)


# DeepSeek-V3's tokenizer.json pre-tokenizer, as shipped on the hub.
DEEPSEEK_V3_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[一-龥\u3040-ゟ゠-ヿ]+"}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
                                           "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_deepseek_v3_pre_tokenizer_matches_the_hub_one(f32_model, tmp_path):
    hf_dir, path = f32_model
    shutil.copytree(hf_dir, tmp_path / "v3tok")
    spec = json.loads((tmp_path / "v3tok" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = DEEPSEEK_V3_PRE
    (tmp_path / "v3tok" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    hf = Tokenizer.from_dir(tmp_path / "v3tok")
    with GGUFCheckpoint.open(path) as ck:
        ours = tokenizer_from_gguf(dict(ck.metadata, **{"tokenizer.ggml.pre": "deepseek-v3"}), "test")
    for text in TEXTS + ["12345 abc's 3.14159!!\n\n  x", "日本語のテキストです。漢字"]:
        assert ours.encode(text) == hf.encode(text), text


def test_unsupported_gguf_tokenizer_points_to_config_dir(f32_model):
    _, path = f32_model
    with GGUFCheckpoint.open(path) as ck:
        meta = ck.metadata
    with pytest.raises(TandemError, match="pre-tokenizer 'tekken' is not supported.*--config-dir"):
        tokenizer_from_gguf(dict(meta, **{"tokenizer.ggml.pre": "tekken"}), "x")
    with pytest.raises(TandemError, match="tokenizer model 'llama' is not supported.*--config-dir"):
        tokenizer_from_gguf(dict(meta, **{"tokenizer.ggml.model": "llama"}), "x")


def test_llm_from_gguf_generates_like_the_hf_directory(f32_model):
    hf_dir, path = f32_model
    expected = LLM(hf_dir, progress=False).generate(CHAT, max_new_tokens=4, temperature=0, ignore_eos=True)
    plain, configured = LLM(path, progress=False), LLM(path, progress=False, config_dir=hf_dir)
    for llm in (plain, configured):
        assert llm.dtype == torch.float32  # an ALL_F32 file runs in float32 under dtype="auto"
        got = llm.generate(CHAT, max_new_tokens=4, temperature=0, ignore_eos=True)
        assert got.prompt_token_ids == expected.prompt_token_ids and got.token_ids == expected.token_ids
    assert plain.hf_config is None and plain.defaults == {}  # no generation_config in the file
    assert configured.hf_config["model_type"] == "deepseek_v3" and configured.defaults["temperature"] == 0.6


def test_sampling_defaults_from_gguf_metadata():
    from types import SimpleNamespace

    from tandem.runtime.loader import ModelFiles

    meta = {"general.sampling.temp": float(np.float32(0.6)), "general.sampling.top_k": 20, "general.sampling.mirostat": 1}
    files = ModelFiles(None, None, None, SimpleNamespace(metadata=meta))
    assert files.generation_defaults() == {"temperature": 0.6, "top_k": 20}


@pytest.mark.parametrize("key, value", [
    ("temp", "hot"), ("temp", -1.0), ("top_k", 2.5), ("top_k", True), ("top_p", 7.0), ("min_p", -0.5),
    ("penalty_repeat", 0.0),
])
def test_bad_sampling_metadata_is_ignored_with_a_warning_naming_the_file(key, value, caplog):
    # Fuzzing: a bad value failed every generate call (then every load); it is only a recommendation.
    from types import SimpleNamespace

    from tandem.runtime.loader import ModelFiles

    meta = {f"general.sampling.{key}": value, "general.sampling.top_k": 20} if key != "top_k" else \
        {f"general.sampling.{key}": value, "general.sampling.temp": float(np.float32(0.6))}
    files = ModelFiles(Path("m.gguf"), None, None, SimpleNamespace(metadata=meta))
    good = {"top_k": 20} if key != "top_k" else {"temperature": 0.6}
    assert files.generation_defaults() == good
    assert f"m.gguf: general.sampling.{key} = {value!r} is not a valid" in caplog.text
    assert "ignored: tandem's default is used" in caplog.text


def test_a_gguf_with_a_bad_sampling_default_still_generates(tmp_path, caplog):
    _, path = write_tiny_gguf(tmp_path, "qwen2_moe", "F32",
                              metadata={"general.sampling.temp": -1.0, "general.sampling.top_p": 0.9})
    llm = LLM(path, progress=False)
    assert llm.defaults == {"top_p": 0.9}
    assert f"{path}: general.sampling.temp = -1.0" in caplog.text
    assert len(llm.generate("hello", max_new_tokens=2, ignore_eos=True).token_ids) == 2


@pytest.mark.parametrize("key, value, kind", [
    ("qwen2moe.block_count", "2", "an integer"), ("qwen2moe.block_count", True, "an integer"),
    ("qwen2moe.expert_count", 8.5, "an integer"), ("qwen2moe.rope.freq_base", "8", "a number"),
    ("qwen2moe.expert_weights_norm", "false", "true or false"),
])
def test_gguf_config_keys_of_the_wrong_type_are_named(tmp_path, key, value, kind):
    """Fuzzing: int() and bool() took a string "2", True and 8.5 as sizes (8.5 experts became 8) and
    "false" as true; a float key given as a string failed with an unrelated TypeError."""
    _, path = write_tiny_gguf(tmp_path, "qwen2_moe", "F32", metadata={key: value})
    with open_model_files(path) as files, pytest.raises(TandemError, match=rf"{path}: the GGUF metadata: "
                                                                           rf"{key} = .* should be {kind}"):
        files.config()


def test_gguf_name_rules_for_old_layouts():
    from tandem.models.common import Renamer
    from tandem.models.gguf_meta import gguf_ffn_rules
    from tandem.models.qwen_moe import QwenMoeForCausalLM

    rename = Renamer(gguf_ffn_rules(), keep_layer=lambda i: True)
    # early Mixtral GGUFs: one tensor per expert, filling slots of the stacked experts
    assert rename("blk.1.ffn_gate.3.weight") == "layers.1.ffn.experts.w_gate[3]"
    assert rename("blk.1.ffn_down_exps.weight") == "layers.1.ffn.experts.w_down"
    assert rename("blk.1.ffn_down.weight") == "layers.1.ffn.down_proj.weight"
    # a Qwen2-MoE shared-expert gate stored as a vector becomes the [1, H] linear weight
    derived = QwenMoeForCausalLM.gguf_derived({"blk.0.ffn_gate_inp_shexp.weight": (6,), "blk.0.attn_q.weight": (4, 6)})
    (sources, shape, combine), = derived.values()
    assert sources == ("blk.0.ffn_gate_inp_shexp.weight",) and shape == (1, 6)
    assert torch.equal(combine([torch.arange(6.0)]), torch.arange(6.0).view(1, 6))


@pytest.mark.parametrize("arch, metadata, field", [
    ("qwen3moe", {"block_count": 2**31 - 1}, "num_hidden_layers"),  # was: a per-layer list of 2**31 entries first
    ("qwen3moe", {"attention.head_count": 0}, "num_attention_heads"),  # was: ZeroDivisionError
    ("llama", {"attention.head_count": 0}, "num_attention_heads"),
])
def test_gguf_counts_are_checked_before_they_are_used(arch, metadata, field):
    from tandem.models.mixtral import MixtralConfig
    from tandem.models.qwen_moe import QwenMoeConfig

    config = QwenMoeConfig if arch.startswith("qwen") else MixtralConfig
    base = {"block_count": 2, "attention.head_count": 4, "embedding_length": 64, "expert_count": 4}
    keys = {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in {**base, **metadata}.items()}}
    with pytest.raises(TandemError, match=field):
        config.from_gguf(keys, ["blk.0.ffn_gate_inp.weight"])
