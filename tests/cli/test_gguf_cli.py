"""`tandem generate / inspect` on GGUF models, --config-dir, and one-line errors for broken GGUF input."""

import pytest

from tandem.cli.main import main
from tandem.testing.tiny_gguf import write_gguf, write_tiny_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF directory, F32 GGUF) of one tiny DeepSeek-V3."""
    return write_tiny_gguf(tmp_path_factory.mktemp("g"), "deepseek_v3", "F32", seed=5)


def run(argv) -> int:
    return main([str(a) for a in argv])


def test_generate_from_gguf_alone_and_with_config_dir(model, capsys):
    # (that the GGUF model generates what its HF twin does is tests/models/test_gguf_models.py's job)
    hf_dir, path = model
    argv = ["generate", path, "--prompt", "def f(x):", "--max-new-tokens", "3", "--temperature", "0"]
    assert run(argv) == 0
    plain = capsys.readouterr()
    assert plain.out.strip() and "decode 3 tok" in plain.err
    assert run(argv + ["--config-dir", hf_dir]) == 0
    assert capsys.readouterr().out == plain.out


def test_inspect_lists_quant_types_and_tensors(tmp_path, capsys):
    _, path = write_tiny_gguf(tmp_path, "deepseek_v3_q", "Q4_K_M", seed=1)
    assert run(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "deepseek2 (GGUF, 1 file(s)) 'tiny deepseek_v3'" in out and "3 (1 dense, 2 MoE)" in out
    assert "Q4_K               23 tensors, 2,181,888 bytes" in out and "Q6_K               3 tensors" in out
    # one line per tensor, layers folded where type and shape agree
    assert "blk.[1-2].ffn_up_exps.weight     Q4_K  [8, 256, 256]  2 x 294,912 bytes" in out
    assert "blk.2.ffn_down_exps.weight       Q6_K  [8, 256, 256]  430,080 bytes" in out
    assert "blk.[0-2].attn_k_b.weight        Q5_0  [4, 64, 32]  3 x 5,632 bytes" in out


def broken(kind: str, model, tmp_path):
    hf_dir, path = model
    if kind == "truncated":
        data = path.read_bytes()
        (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
        return tmp_path / "t.gguf"
    if kind == "missing_tensor":
        return write_gguf(hf_dir, tmp_path / "m.gguf", "F32", drop=("blk.1.ffn_up_exps.weight",))
    if kind == "missing_part":
        (tmp_path / "s").mkdir()
        first = write_gguf(hf_dir, tmp_path / "s" / "m.gguf", "F32", split_max_tensors=20)
        (tmp_path / "s" / "m-00002-of-00003.gguf").unlink()
        return first
    if kind == "unknown_arch":
        (tmp_path / "a.gguf").write_bytes(path.read_bytes().replace(b"deepseek2", b"deepseekX"))  # arch and keys
        return tmp_path / "a.gguf"
    if kind == "mismatched_config_dir":
        return path  # with --config-dir pointing at another model's config
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "truncated or corrupt; download it again"),
        ("missing_tensor", "missing tensors (1): 'layers.1.ffn.experts.w_up'"),
        ("missing_part", "1 of 3 parts of the split GGUF model m are missing"),
        ("unknown_arch", "unsupported GGUF architecture deepseekX"),
        ("mismatched_config_dir", "config/weights mismatch"),
    ],
)
def test_broken_gguf_fails_with_one_error(model, tmp_path, capsys, kind, message):
    target = broken(kind, model, tmp_path)
    extra = []
    if kind == "mismatched_config_dir":
        other, _ = write_tiny_gguf(tmp_path / "other", "deepseek_v2", "F32")
        extra = ["--config-dir", other]
    assert run(["generate", target, "--prompt", "hi"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    # one line, but for the loader's list of several mapping problems (one per indented line)
    assert err.count("\n") == 1 or kind == "mismatched_config_dir"


def test_config_dir_is_only_for_gguf(model, capsys):
    hf_dir, _ = model
    assert run(["generate", hf_dir, "--prompt", "hi", "--config-dir", hf_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--config-dir is for GGUF models" in err and err.count("\n") == 1
