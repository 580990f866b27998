"""Broken Hugging Face model directories (found by fuzzing): every one must fail with a TandemError
that names the file, never a raw exception, a hang or a silently wrong load."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from tandem.errors import TandemError
from tandem.runtime.llm import LLM
from tandem.runtime.loader import open_model_files
from tandem.runtime.tokenizer import Tokenizer
from tandem.testing.tiny import write_tiny
from tandem.testing.tiny_tokenizer import write_tokenizer
from tandem.weights.checkpoint import Checkpoint

# --- safetensors headers ------------------------------------------------------------------------


def small_file(directory):
    """model.safetensors with two float32 tensors: a [4, 2] then b [3]."""
    path = directory / "model.safetensors"
    save_file({"a": torch.ones(4, 2), "b": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    return path


def rewrite(path, edit, extra=b""):
    """Rewrite the header of `path` with edit(header) (in place, or a returned new one); data kept."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header = edit(header) or header
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:] + extra)


@pytest.mark.parametrize(
    "edit, message",
    [
        # int() took these; safetensors refuses them only when the file is opened for reading.
        (lambda h: h["a"].update(shape=[-4, -2]), r"shape \[-4, -2\], not a list of non-negative integers"),
        (lambda h: h["a"].update(shape=[4.0, 2.0]), r"shape \[4.0, 2.0\]"),
        (lambda h: h["a"].update(shape=["4", "2"]), r"shape \['4', '2'\]"),
        (lambda h: h["b"].update(shape=[True, 3]), r"shape \[True, 3\]"),
        (lambda h: h["a"].update(data_offsets=[0.0, 32.0]), r"data_offsets \[0.0, 32.0\]"),
        (lambda h: h["a"].update(dtype=["F32"]), r"dtype \['F32'\], not a name"),
        (lambda h: h.update(a=[1]), r"tensor 'a' is described by \[1\], not an object"),
        (lambda h: h.update(__metadata__={"format": {"pt": 1}}), "__metadata__ is not an object of strings"),
        (lambda h: h.update(__metadata__=5), "__metadata__ is not an object of strings"),
        # Overlapping tensors: refused by safetensors only on opening.
        (lambda h: h["b"].update(data_offsets=[4, 16]), "tensor 'b' starts at byte 4 of the data, expected 32"),
        (lambda h: b"[" * 100_000 + b"]" * 100_000, "corrupt safetensors header"),  # RecursionError
    ],
    ids=["negative shape", "float shape", "string shape", "bool shape", "float offsets", "list dtype", "list entry",
         "nested metadata", "metadata number", "overlap", "deep nesting"],
)
def test_corrupt_headers_are_refused_when_opened(tmp_path, edit, message):
    path = small_file(tmp_path)
    rewrite(path, edit)
    with pytest.raises(TandemError, match=message) as e:
        Checkpoint.open(tmp_path)
    assert str(path) in str(e.value)


def test_bytes_after_the_last_tensor_are_refused(tmp_path):
    rewrite(small_file(tmp_path), lambda h: None, extra=b"\0" * 16)
    with pytest.raises(TandemError, match="model.safetensors has 16 bytes after its last tensor"):
        Checkpoint.open(tmp_path)


def test_a_gap_between_tensors_is_refused(tmp_path):
    # b moved 8 bytes on, the file 8 bytes longer: every tensor fits, yet bytes 32..40 belong to none.
    rewrite(small_file(tmp_path), lambda h: h["b"].update(data_offsets=[40, 52]), extra=b"\0" * 8)
    with pytest.raises(TandemError, match="'b' starts at byte 40 of the data, expected 32"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("kind", ["directory", "dangling link", "link loop"])
def test_weight_files_that_cannot_be_read(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "dangling link":
        os.symlink(tmp_path / "gone.safetensors", path)
    else:
        os.symlink(path, path)
    with pytest.raises(TandemError, match=f"cannot read {path}"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("shard", [5, None, ["model-00001-of-00001.safetensors"], {}, "", "..", "/etc/passwd",
                                   "../other/model-00001-of-00001.safetensors", "sub/model-00001-of-00001.safetensors"])
def test_index_must_name_files_beside_it(tmp_path, shard):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": shard}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(TandemError, match=r"index.json puts tensor 'b' in .*, which is not a weight file name"):
        Checkpoint.open(tmp_path)


def test_index_nested_too_deep(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TandemError, match="cannot read index .*model.safetensors.index.json"):
        Checkpoint.open(tmp_path)


# --- fp8 ----------------------------------------------------------------------------------------


def test_fp8_weight_that_is_not_2d(tmp_path):
    save_file({"norm.weight": torch.ones(64).to(torch.float8_e4m3fn), "norm.weight_scale_inv": torch.ones(1)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(TandemError, match=r"fp8 tensor 'norm.weight' in .* has shape \(64,\), but block-scaled fp8 "
                                          "weights are 2-D"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn])
def test_fp8_scale_that_is_not_a_float(tmp_path, dtype):
    # Of the right shape, an integer scale used to dequantize silently (to multiples of whole numbers).
    scale = torch.ones(1, 1).to(dtype)
    save_file({"w.weight": torch.ones(8, 8).to(torch.float8_e4m3fn), "w.weight_scale_inv": scale},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(TandemError, match=r"fp8 scale 'w.weight_scale_inv' in .*model.safetensors is stored as"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fp8_scale_that_is_not_finite(tmp_path, value):
    # It dequantized to NaN weights: NaN logits later, only for prompts routed through the expert.
    scale = torch.tensor([[1.0, value]])
    save_file({"w.weight": torch.ones(8, 160).to(torch.float8_e4m3fn), "w.weight_scale_inv": scale},
              str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ck, pytest.raises(TandemError, match="fp8 scale 'w.weight_scale_inv' in .* holds "
                                                                         "NaN or infinite values"):
        ck.get("w.weight")


# --- config.json --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {v: write_tiny(tmp_path_factory.mktemp(v), v) for v in ("deepseek_v3", "qwen2_moe", "qwen3_moe")}


def with_config(tiny_dirs, tmp_path, variant="deepseek_v3", **changes):
    """A copy of a tiny model directory (weights linked) whose config.json has `changes`."""
    src, out = tiny_dirs[variant], tmp_path / "m"
    out.mkdir()
    for f in src.iterdir():
        os.symlink(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(architectures=5), r"architectures 5 should be a list of class names"),
        (dict(architectures=[["DeepseekV3ForCausalLM"]]), r"architectures \[\['DeepseekV3ForCausalLM'\]\] should be"),
        (dict(architectures=None, model_type=["deepseek_v3"]), r"model_type \['deepseek_v3'\] should be a name"),
    ],
)
def test_architectures_of_the_wrong_type(tiny_dirs, tmp_path, changes, message):
    path = with_config(tiny_dirs, tmp_path, **changes)
    with open_model_files(path) as files, pytest.raises(TandemError, match=message) as e:
        files.config()
    assert str(path / "config.json") in str(e.value)


@pytest.mark.parametrize(
    "variant, changes, message",
    [
        # Built the model first: 2**31 rope dims on the CPU, 2**31 layers, 10**30 overflowing torch.
        ("deepseek_v3", dict(qk_rope_head_dim=2**31), r"qk_rope_head_dim = 2147483648 is larger than any model"),
        ("deepseek_v3", dict(vocab_size=10**30), r"vocab_size = 10{30} is larger than any model"),
        ("deepseek_v3", dict(num_nextn_predict_layers=10**6), r"num_nextn_predict_layers = 1000000 is larger"),
        # Qwen2-MoE's config listed every layer's attention type while being parsed.
        ("qwen2_moe", dict(num_hidden_layers=10**7), r"num_hidden_layers = 10000000 is larger than any model"),
    ],
)
def test_config_sizes_no_model_has(tiny_dirs, tmp_path, variant, changes, message):
    path = with_config(tiny_dirs, tmp_path, variant, **changes)
    with open_model_files(path) as files, pytest.raises(TandemError, match=message) as e:
        files.config()
    assert f"{path}: config.json" in str(e.value)


YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
            mscale=0.707, mscale_all_dim=0.707)


@pytest.mark.parametrize(
    "scaling",
    [dict(factor="x"), dict(factor=None), dict(factor=float("nan")), dict(original_max_position_embeddings=0),
     dict(original_max_position_embeddings="x"), dict(beta_fast=-1), dict(mscale="x"), dict(attention_factor=[])],
    ids=lambda s: repr(s),
)
def test_rope_scaling_values_of_the_wrong_type_or_range(tiny_dirs, tmp_path, scaling):
    path = with_config(tiny_dirs, tmp_path, rope_scaling={**YARN, **scaling})
    with open_model_files(path) as files, pytest.raises(TandemError, match=r"config.json: rope_scaling .* (is not "
                                                                           "valid|gives non-finite|must be a finite)"):
        files.config()


def test_bad_rope_scaling_fails_loading_with_the_file_named(tiny_dirs, tmp_path):
    # It used to surface as a ValueError (math domain error) from deep inside building the model.
    path = with_config(tiny_dirs, tmp_path, rope_scaling={**YARN, "original_max_position_embeddings": -1})
    with pytest.raises(TandemError, match=f"{path}: config.json: rope_scaling"):
        LLM(path, dtype="float32", progress=False)


@pytest.mark.parametrize("value", ["false", [], 2, 0.5, float("nan")])
def test_config_flags_must_be_true_or_false(tiny_dirs, tmp_path, value):
    # A string "false" routed as True: renormalized top-k weights where the model has none.
    path = with_config(tiny_dirs, tmp_path, "qwen3_moe", norm_topk_prob=value)
    with open_model_files(path) as files, pytest.raises(TandemError, match="config.json: config field norm_topk_prob = "
                                                                         ".* must be true or false"):
        files.config()


def test_config_checks_name_the_file(tiny_dirs, tmp_path):
    path = with_config(tiny_dirs, tmp_path, "qwen3_moe", hidden_act="gelu")
    with open_model_files(path) as files, pytest.raises(TandemError, match=f"^{path}: config.json: hidden_act 'gelu'"):
        files.config()


def test_hf_layer_count_is_checked_against_the_weights(tiny_dirs):
    # The layer index was matched at the start of the name, which HF's model.layers.N. never is.
    with open_model_files(tiny_dirs["qwen3_moe"]) as files:
        files.check_layer_count(2)
        with pytest.raises(TandemError, match="says 1000 layers but the weights hold layers 0..1"):
            files.check_layer_count(1000)


def test_weights_without_any_layer(tiny_dirs, tmp_path):
    path = with_config(tiny_dirs, tmp_path)
    (path / "model.safetensors").unlink()
    save_file({"model.embed_tokens.weight": torch.ones(4, 4)}, str(path / "model.safetensors"))
    with open_model_files(path) as files, pytest.raises(TandemError, match="says 3 layers but the weights hold none"):
        files.check_layer_count(3)


# --- tokenizer files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    return out


@pytest.fixture
def tok_dir(tokenizer_src, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    for f in tokenizer_src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"eos_token_id": ' + "9" * 5000 + "}"],
                         ids=["deep", "huge int"])
def test_json_the_parser_refuses(tok_dir, name, text):
    (tok_dir / name).write_text(text)
    with pytest.raises(TandemError, match=f"cannot parse {tok_dir / name}"):
        Tokenizer.from_dir(tok_dir)


def test_chat_template_file_not_utf8(tok_dir):
    (tok_dir / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(TandemError, match=f"cannot read {tok_dir / 'chat_template.jinja'}"):
        Tokenizer.from_dir(tok_dir)


def test_chat_template_list_with_odd_names(tok_dir):
    templates = [{"name": ["default"], "template": "x"}, {"name": "default", "template": "{{ 'ok' }}"}]
    edit_json(tok_dir / "tokenizer_config.json", lambda c: c.update(chat_template=templates))
    assert Tokenizer.from_dir(tok_dir).chat_template == "{{ 'ok' }}"


def test_special_ids_are_integers_not_bools(tok_dir):
    edit_json(tok_dir / "tokenizer_config.json", lambda c: [c.pop("bos_token"), c.update(eos_token="")])
    edit_json(tok_dir / "generation_config.json", lambda c: c.update(bos_token_id=True, eos_token_id=[True, 7]))
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.bos_id is None and tok.eos_ids == {7}  # True is no token id; "" names no token


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ 1 / 0 }}", "failed to render .*ZeroDivisionError"),
        ("{{ [1, 2] | slice(0) | list }}", "failed to render .*ZeroDivisionError"),
        ("{{ 0.0 ** -1 }}", "failed to render .*ZeroDivisionError"),
        ("{{ 'x'.encode('no-such-codec') }}", "failed to render .*LookupError"),
        ("{% break %}", "does not compile .*SyntaxError"),
        ("{% macro f(a, a) %}{% endmacro %}", "does not compile .*SyntaxError"),
        ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "does not compile .*RecursionError"),
        ("{{ '\\ud800' }}", "lone UTF-16 surrogate"),
    ],
    ids=["div", "slice", "pow", "codec", "break", "duplicate argument", "deep nesting", "surrogate"],
)
def test_chat_templates_that_fail(tok_dir, template, message):
    edit_json(tok_dir / "tokenizer_config.json", lambda c: c.update(chat_template=template))
    tok = Tokenizer.from_dir(tok_dir)
    with pytest.raises(TandemError, match=message):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def write_tokenizer_json(directory, model, **parts):
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                 "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None, "model": model}
    (directory / "tokenizer.json").write_text(json.dumps({**tokenizer, **parts}))


WORDS = {"type": "WordLevel", "vocab": {"Hello": 0, ",": 1, "world": 2, "<s>": 3}, "unk_token": "<unk>"}


def test_tokenizer_json_that_cannot_encode(tmp_path):
    # A post-processor naming a special token it does not define: a Rust panic on every encode
    # (pyo3's PanicException, a BaseException); an unknown token missing from the vocabulary.
    single = [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    write_tokenizer_json(tmp_path, WORDS, post_processor={"type": "TemplateProcessing", "single": single, "pair": [],
                                                          "special_tokens": {}})
    with pytest.raises(TandemError, match=f"{tmp_path / 'tokenizer.json'} cannot encode text .*PanicException"):
        Tokenizer.from_dir(tmp_path)
    write_tokenizer_json(tmp_path, WORDS)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello world") == [0, 2]
    with pytest.raises(TandemError, match=f"the tokenizer of {tmp_path} cannot encode this text .*Missing \\[UNK\\]"):
        tok.encode("Hello there")


def test_tokenizer_json_truncation_and_padding_are_ignored(tmp_path):
    # As transformers does: they cut or padded every prompt to their length, silently.
    write_tokenizer_json(tmp_path, WORDS, truncation={"max_length": 1, "stride": 0, "strategy": "LongestFirst",
                                                      "direction": "Right"})
    assert Tokenizer.from_dir(tmp_path).encode("Hello , world") == [0, 1, 2]
    write_tokenizer_json(tmp_path, WORDS, padding={"strategy": {"Fixed": 6}, "direction": "Right", "pad_id": 3,
                                                   "pad_to_multiple_of": None, "pad_type_id": 0, "pad_token": "<s>"})
    assert Tokenizer.from_dir(tmp_path).encode("Hello , world") == [0, 1, 2]


def test_lone_surrogates_in_text(tok_dir):
    with pytest.raises(TandemError, match=r"lone UTF-16 surrogate \('\\udc80' at character 2\)"):
        Tokenizer.from_dir(tok_dir).encode("ab\udc80c")
