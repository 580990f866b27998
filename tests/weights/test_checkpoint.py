"""Checkpoint: finding, checking and reading safetensors model directories."""

import json
import math
import struct

import pytest
import torch
from safetensors.torch import save_file

from tandem.errors import TandemError
from tandem.weights.checkpoint import Checkpoint


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g).to(torch.float16),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(4, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
        "lm_head.weight": torch.randn(16, 8, generator=g),
        "positions": torch.arange(10, dtype=torch.int64),
    }


def save_sharded(tensors, directory, n_shards=3):
    """Write tensors into n_shards files plus a model.safetensors.index.json; returns the weight map."""
    names = list(tensors)
    weight_map = {}
    for s in range(n_shards):
        file = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, str(directory / file))
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def header_order(path):
    """Tensor names of one file by data offset, parsed independently of tandem."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def assert_reads_back(ck, tensors):
    assert sorted(ck.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert ck.shape(name) == tuple(t.shape)
        assert ck.dtype(name) == t.dtype
        assert ck.nbytes(name) == t.numel() * t.element_size()
        got = ck.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    assert ck.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_single_file_round_trip(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ck:
        assert_reads_back(ck, tensors)
        assert ck.names() == header_order(tmp_path / "model.safetensors")


def test_sharded_equals_single(tmp_path):
    tensors = sample_tensors()
    (tmp_path / "single").mkdir()
    (tmp_path / "sharded").mkdir()
    save_file(tensors, str(tmp_path / "single" / "model.safetensors"))
    weight_map = save_sharded(tensors, tmp_path / "sharded")
    with Checkpoint.open(tmp_path / "single") as single, Checkpoint.open(tmp_path / "sharded") as sharded:
        assert_reads_back(sharded, tensors)
        assert sorted(single.names()) == sorted(sharded.names())
        for name in single.names():
            assert torch.equal(single.get(name), sharded.get(name))
        # Shard by shard, each in file order: reading names() in turn streams every file once.
        shards = sorted(set(weight_map.values()))
        assert sharded.names() == [n for s in shards for n in header_order(tmp_path / "sharded" / s)]


def test_get_converts_dtype(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ck:
        name = "model.layers.0.self_attn.q_proj.weight"
        got = ck.get(name, dtype=torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, tensors[name].float())


def test_any_safetensors_files_without_index(tmp_path):
    tensors = sample_tensors()
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:3]}, str(tmp_path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[3:]}, str(tmp_path / "b.safetensors"))
    with Checkpoint.open(tmp_path) as ck:
        assert_reads_back(ck, tensors)


def test_path_to_one_file(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    with Checkpoint.open(tmp_path / "weights.safetensors") as ck:
        assert_reads_back(ck, tensors)


def test_same_tensor_in_two_files_is_an_error(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"x": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(TandemError, match=r"'x' is in both a\.safetensors and b\.safetensors"):
        Checkpoint.open(tmp_path)


def test_missing_shard(tmp_path):
    weight_map = save_sharded(sample_tensors(), tmp_path)
    gone = sorted(set(weight_map.values()))[1]
    (tmp_path / gone).unlink()
    with pytest.raises(TandemError, match="incomplete") as e:
        Checkpoint.open(tmp_path)
    assert gone in str(e.value) and "1 of 3" in str(e.value)


def test_index_names_tensor_not_in_shard(tmp_path):
    weight_map = save_sharded(sample_tensors(), tmp_path)
    weight_map["model.layers.2.mlp.down_proj.weight"] = sorted(set(weight_map.values()))[0]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(TandemError, match=r"model\.layers\.2\.mlp\.down_proj\.weight"):
        Checkpoint.open(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), str(path))
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 10)
    with pytest.raises(TandemError, match="truncated") as e:
        Checkpoint.open(tmp_path)
    message = str(e.value)
    assert "model.safetensors" in message and str(full - 10) in message and str(full) in message


def test_truncated_inside_header(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), str(path))
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(TandemError, match=r"model\.safetensors is truncated"):
        Checkpoint.open(tmp_path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), str(path))
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#garbage#")
    with pytest.raises(TandemError, match=r"model\.safetensors has a corrupt safetensors header"):
        Checkpoint.open(tmp_path)


def test_header_length_past_end(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(TandemError, match=r"model\.safetensors"):
        Checkpoint.open(tmp_path)


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TandemError, match="no \\*.safetensors"):
        Checkpoint.open(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(TandemError, match="not a model directory"):
        Checkpoint.open(tmp_path / "nowhere")


def test_unknown_name(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ck, pytest.raises(TandemError, match="'y'"):
        ck.get("y")


def test_close_releases_the_mapping(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.ones(1000)}, str(path))

    def mapped():
        with open("/proc/self/maps") as f:
            return str(path) in f.read()

    with Checkpoint.open(tmp_path) as ck:
        assert not mapped()  # opened lazily, on the first get
        x = ck.get("x")
        assert mapped()
    del x
    assert not mapped()


# --- FP8 (DeepSeek-V3 release format) ---


def fp8_checkpoint(directory, shape=(300, 200), block=(128, 128), config_block=(128, 128)):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]), generator=g) + 0.5
    norm = torch.randn(shape[1], generator=g).to(torch.bfloat16)
    save_file(
        {"layer.weight": w, "layer.weight_scale_inv": scale, "norm.weight": norm},
        str(directory / "model.safetensors"),
    )
    if config_block is not None:
        quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": list(config_block)}
        (directory / "config.json").write_text(json.dumps({"quantization_config": quant}))
    return w, scale, norm


def expected_dequant(w, scale, block):
    """Per-element scale by integer division of coordinates: another way to say the format."""
    rows = torch.arange(w.shape[0])[:, None] // block[0]
    cols = torch.arange(w.shape[1])[None, :] // block[1]
    return w.float() * scale[rows, cols]


def test_fp8_weights_come_back_dequantized(tmp_path):
    w, scale, norm = fp8_checkpoint(tmp_path)
    with Checkpoint.open(tmp_path) as ck:
        # The scale is hidden; the rest keeps file order.
        in_file = header_order(tmp_path / "model.safetensors")
        assert ck.names() == [n for n in in_file if n != "layer.weight_scale_inv"]
        assert ck.dtype("layer.weight") == torch.float32 and ck.shape("layer.weight") == (300, 200)
        assert ck.nbytes("layer.weight") == 300 * 200 + scale.numel() * 4
        assert ck.total_bytes == ck.nbytes("layer.weight") + ck.nbytes("norm.weight")
        got = ck.get("layer.weight")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected_dequant(w, scale, (128, 128)), rtol=0, atol=0)
        bf16 = ck.get("layer.weight", dtype=torch.bfloat16)
        assert bf16.dtype == torch.bfloat16
        torch.testing.assert_close(bf16, expected_dequant(w, scale, (128, 128)).to(torch.bfloat16))
        assert torch.equal(ck.get("norm.weight"), norm)
        with pytest.raises(TandemError):
            ck.get("layer.weight_scale_inv")


def test_fp8_block_size_from_config(tmp_path):
    w, scale, _ = fp8_checkpoint(tmp_path, shape=(100, 70), block=(32, 64), config_block=(32, 64))
    with Checkpoint.open(tmp_path) as ck:
        assert ck.fp8_block == (32, 64)
        torch.testing.assert_close(ck.get("layer.weight"), expected_dequant(w, scale, (32, 64)), rtol=0, atol=0)


def test_fp8_default_block_without_config(tmp_path):
    w, scale, _ = fp8_checkpoint(tmp_path, config_block=None)
    with Checkpoint.open(tmp_path) as ck:
        torch.testing.assert_close(ck.get("layer.weight"), expected_dequant(w, scale, (128, 128)), rtol=0, atol=0)


def test_fp8_scale_shape_disagrees_with_config(tmp_path):
    fp8_checkpoint(tmp_path, block=(128, 128), config_block=(64, 64))
    with pytest.raises(TandemError, match="'layer.weight'.*weight_block_size"):
        Checkpoint.open(tmp_path)


def test_fp8_weight_without_scale(tmp_path):
    save_file({"layer.weight": torch.ones(4, 4).to(torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TandemError, match="'layer.weight' has no 'layer.weight_scale_inv'"):
        Checkpoint.open(tmp_path)


def test_fp8_scale_in_another_shard(tmp_path):
    w, scale, _ = fp8_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    save_file({"layer.weight": w}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"layer.weight_scale_inv": scale}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {"layer.weight": "model-00001-of-00002.safetensors",
                  "layer.weight_scale_inv": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with Checkpoint.open(tmp_path) as ck:
        assert ck.names() == ["layer.weight"]
        torch.testing.assert_close(ck.get("layer.weight"), expected_dequant(w, scale, (128, 128)), rtol=0, atol=0)
