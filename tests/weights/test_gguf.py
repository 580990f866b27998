"""GGUFCheckpoint: shapes, types and values of GGUF tensors, split files, broken files; the derived
view; and the quantized-block experts backend against plain torch experts."""

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from tandem.errors import TandemError
from tandem.layers.block_experts import BlockExperts, Blocks
from tandem.layers.moe import MoEConfig, TorchExperts
from tandem.weights.derived import DerivedCheckpoint
from tandem.weights.gguf import GGUFCheckpoint, torch_dequantizer
from tandem.weights.quant import quantize

# name -> (torch-order shape, storage); written in this order
SAMPLE = {
    "a.weight": ((3, 5), "F32"),
    "b.weight": ((4, 64), "Q8_0"),
    "c.weight": ((2, 3, 256), "Q4_K"),  # merged-experts style 3-D
    "d.weight": ((2, 8), "BF16"),
    "e.weight": ((7,), "F16"),
    "f.weight": ((2, 256), "Q6_K"),
}


def values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(np.float32) for n, (shape, _) in SAMPLE.items()}


def write_sample(path, vals=None, split_max_tensors=0, names=None, extra=None):
    """Write SAMPLE (or `names` of it) with gguf's own writer; returns the first file's path."""
    vals = vals or values()
    w = gguf.GGUFWriter(path, "test", split_max_tensors=split_max_tensors)
    w.add_uint32("test.answer", 42)
    w.add_array("test.list", ["x", "y"])
    for name in names or SAMPLE:
        x, fmt = vals[name], SAMPLE[name][1]
        if fmt == "F32":
            w.add_tensor(name, x)
        elif fmt == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quantize(x, fmt), raw_dtype=T[fmt])
    for name, (raw, qtype) in (extra or {}).items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)[0]


def reference(ck_path) -> dict[str, np.ndarray]:
    """gguf-py's own dequantization (llama.cpp's reference numpy code), in torch order."""
    reader = gguf.GGUFReader(ck_path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}


def test_shapes_types_values_and_raw_blocks(tmp_path):
    path = write_sample(tmp_path / "m.gguf")
    ref = reference(path)
    with GGUFCheckpoint.open(path) as ck:
        assert ck.names() == list(SAMPLE) and len(ck) == len(SAMPLE) and "a.weight" in ck
        assert ck.metadata["test.answer"] == 42 and ck.metadata["test.list"] == ["x", "y"]
        assert ck.metadata["general.architecture"] == "test"
        for name, (shape, fmt) in SAMPLE.items():
            assert ck.shape(name) == shape and ck.qtype(name) == fmt
            assert ck.is_quantized(name) == (fmt not in ("F32", "F16", "BF16"))
            got = ck.get(name)
            assert got.dtype == torch.float32 and tuple(got.shape) == shape
            assert np.array_equal(got.numpy(), ref[name].reshape(shape)), name
            assert torch.equal(ck.get(name, torch.bfloat16), got.to(torch.bfloat16))
        assert ck.nbytes("c.weight") == 2 * 3 * 144 and ck.nbytes("d.weight") == 32
        assert ck.total_bytes == sum(ck.nbytes(n) for n in SAMPLE)
        raw = ck.raw("c.weight")  # [E, rows, row_bytes], the file's bytes
        assert raw.dtype == torch.uint8 and tuple(raw.shape) == (2, 3, 144)
        assert np.array_equal(raw.numpy(), quantize(values()["c.weight"], "Q4_K"))
        assert ck.raw("c.weight").data_ptr() == raw.data_ptr()  # a view of the mapping, not a copy
        assert tuple(ck.raw("b.weight").shape) == (4, 68)


def test_split_parts_load_like_the_single_file(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "split").mkdir()
    single = write_sample(tmp_path / "one" / "m.gguf")
    first = write_sample(tmp_path / "split" / "m.gguf", split_max_tensors=2)
    parts = sorted((tmp_path / "split").iterdir())
    assert [p.name for p in parts] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)] and first == parts[0]
    with GGUFCheckpoint.open(single) as one:
        expected = {n: one.get(n) for n in one.names()}
    for given in (parts[0], parts[1], tmp_path / "split"):  # any part, or the folder
        with GGUFCheckpoint.open(given) as ck:
            assert ck.parts == parts and ck.names() == list(expected)
            assert ck.metadata["test.answer"] == 42
            assert all(torch.equal(ck.get(n), t) for n, t in expected.items())


@pytest.fixture
def split_dir(tmp_path):
    d = tmp_path / "split"
    d.mkdir()
    write_sample(d / "m.gguf", split_max_tensors=2)
    return d


def test_missing_part_is_named(split_dir):
    (split_dir / "m-00002-of-00003.gguf").unlink()
    with pytest.raises(TandemError, match=r"1 of 3 parts .* missing .*m-00002-of-00003\.gguf"):
        GGUFCheckpoint.open(split_dir / "m-00001-of-00003.gguf")


def test_parts_of_different_models_are_refused(split_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    write_sample(other / "m.gguf", split_max_tensors=2, names=["a.weight", "b.weight", "c.weight", "d.weight", "f.weight"])
    shutil.copy(other / "m-00003-of-00003.gguf", split_dir / "m-00003-of-00003.gguf")
    with pytest.raises(TandemError, match="different models"):
        GGUFCheckpoint.open(split_dir)


def test_part_renamed_out_of_its_split_is_refused(split_dir, tmp_path):
    lone = tmp_path / "lone.gguf"
    shutil.copy(split_dir / "m-00001-of-00003.gguf", lone)
    with pytest.raises(TandemError, match="part 1 of a GGUF split into 3"):
        GGUFCheckpoint.open(lone)


def test_folder_with_two_models_is_ambiguous(tmp_path):
    write_sample(tmp_path / "a.gguf")
    write_sample(tmp_path / "b.gguf")
    with pytest.raises(TandemError, match="holds 2 GGUF models"):
        GGUFCheckpoint.open(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "magic", "empty", "header"])
def test_broken_files_fail_in_one_line(tmp_path, damage):
    path = write_sample(tmp_path / "m.gguf")
    data = path.read_bytes()
    broken = {"truncated": data[: len(data) - 100], "magic": b"XXXX" + data[4:], "empty": b"",
              "header": data[:200]}[damage]
    path.write_bytes(broken)
    with pytest.raises(TandemError) as e:
        GGUFCheckpoint.open(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unsupported_quant_type_names_tensor_and_type(tmp_path):
    q4_1 = np.zeros((2, 20), dtype=np.uint8)  # two Q4_1 blocks: a type tandem has no codec for
    path = write_sample(tmp_path / "m.gguf", extra={"odd.weight": (q4_1, T.Q4_1)})
    with pytest.raises(TandemError, match=r"'odd\.weight' \(Q4_1\).*supported: F32"):
        GGUFCheckpoint.open(path)


def test_derived_view_hides_sources_and_combines(tmp_path):
    path = write_sample(tmp_path / "m.gguf")
    with GGUFCheckpoint.open(path) as base:
        view = DerivedCheckpoint(base, {"ad": (("a.weight", "d.weight"), (5, 5), lambda p: torch.cat([p[0], p[1][:, :5]]))})
        assert view.names() == ["ad", "b.weight", "c.weight", "e.weight", "f.weight"]
        assert "a.weight" not in view and "ad" in view and len(view) == 5
        assert view.shape("ad") == (5, 5) and view.nbytes("ad") == base.nbytes("a.weight") + base.nbytes("d.weight")
        assert torch.equal(view.get("ad"), torch.cat([base.get("a.weight"), base.get("d.weight")[:, :5]]))
        assert view.qtype("f.weight") == "Q6_K"  # the rest passes through
    with GGUFCheckpoint.open(path) as base, pytest.raises(TandemError, match="not in"):
        DerivedCheckpoint(base, {"x": (("nope",), (1,), lambda p: p[0])})


# --- the quantized-block experts backend ---


def expert_case(fmt: str, e: int = 6, h: int = 256, i: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = {p: torch.randn(e, *s, generator=g) / 16 for p, s in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i)))}
    blocks = {p: torch.from_numpy(quantize(x.numpy(), fmt)) for p, x in w.items()}
    cfg = MoEConfig(hidden_size=h, intermediate_size=i, num_experts=e, top_k=2)
    return cfg, blocks


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0"])
def test_block_experts_equal_torch_experts_on_dequantized_weights(fmt):
    cfg, blocks = expert_case(fmt)
    calls = []

    def counting(raw):
        calls.append(1)
        return torch_dequantizer(fmt)(raw)

    backend = BlockExperts(cfg, **{p: Blocks(b, fmt, counting) for p, b in blocks.items()})
    reference = TorchExperts(cfg)
    for p, b in blocks.items():
        getattr(reference, f"w_{p}").data = torch_dequantizer(fmt)(b)  # [E, rows, K]
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 3], [3, -1], [0, 5], [5, 3], [-1, 0]], dtype=torch.int32)
    w = torch.rand(5, 2, generator=torch.Generator().manual_seed(2))
    got = backend.wait(backend.submit(x, ids, w))
    expected = reference.wait(reference.submit(x, ids, w))
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert len(calls) == 3 * 3  # experts 0, 3, 5 only, three projections each
    assert backend.nbytes == sum(b.numel() for b in blocks.values()) and not list(backend.parameters())


def test_block_experts_reject_blocks_that_do_not_fit_the_config():
    cfg, blocks = expert_case("Q8_0", e=4)
    bad = dict(blocks, up=blocks["up"][:3])
    with pytest.raises(TandemError, match=r"up blocks must be uint8 \[4, rows, row_bytes\]"):
        BlockExperts(cfg, **{p: Blocks(b, "Q8_0", torch_dequantizer("Q8_0")) for p, b in bad.items()})


def test_misplaced_or_overlapping_tensor_data_is_refused():
    """A corrupt offset or type made a tensor read its neighbour's bytes (fuzzing): offsets must
    sit on the file's alignment and tensors must not overlap, as llama.cpp checks."""
    from types import SimpleNamespace as NS

    from tandem.weights.gguf import _check_placement

    def reader(*spans):
        return NS(alignment=32, data_offset=1000,
                  tensors=[NS(name=f"t{i}", data_offset=s, n_bytes=n) for i, (s, n) in enumerate(spans)])

    _check_placement(Path("ok.gguf"), reader((1000, 64), (1064, 32), (1096, 10)))
    with pytest.raises(TandemError, match="'t1' starts at byte 1065, not on the file's 32-byte alignment"):
        _check_placement(Path("bad.gguf"), reader((1000, 64), (1065, 32)))
    with pytest.raises(TandemError, match="'t0' and 't1' overlap"):
        _check_placement(Path("bad.gguf"), reader((1000, 128), (1064, 32)))


def test_unsupported_gguf_versions_are_named(tmp_path):
    """Fuzzing: a version-4 file was reported as truncated or corrupt; it is a newer format."""
    path = write_sample(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    with GGUFCheckpoint.open(path):
        pass
    for version, order in ((4, "little"), (1, "little"), (4, "big")):
        data[4:8] = version.to_bytes(4, order)
        bad = tmp_path / f"v{version}{order}.gguf"
        bad.write_bytes(data)
        with pytest.raises(TandemError, match=rf"is GGUF version {version}; tandem reads versions 2, 3"):
            GGUFCheckpoint.open(bad)
