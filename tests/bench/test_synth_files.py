"""Synthetic GGUF files: written as planned, valid blocks, loadable and runnable in tandem (and llama.cpp)."""

import hashlib
import importlib.util

import numpy as np
import pytest

from tandem.cli.main import main
from tandem.runtime.llm import LLM
from tandem.testing.synth import ARCHS, SYNTH_KEY, plan, write_synth
from tandem.testing.synth.blocks import small_f32
from tandem.weights.gguf import GGUFCheckpoint

SCALE = 16  # debug width: every test file is a few MB


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 2-layer debug-scale Q4_K_M file of every architecture."""
    root = tmp_path_factory.mktemp("synth")
    return {a: write_synth(root / f"{a}.gguf", a, 2, "Q4_K_M", scale=SCALE, progress=False).path for a in ARCHS}


def test_files_hold_the_planned_tensors_with_sane_values(files):
    for arch, path in files.items():
        m = plan(arch, 2, "Q4_K_M", scale=SCALE)
        with GGUFCheckpoint.open(path) as ckpt:
            assert ckpt.names() == [t.name for t in m.tensors]
            assert [(ckpt.shape(t.name), ckpt.qtype(t.name), ckpt.nbytes(t.name)) for t in m.tensors] == [
                (t.shape, t.format, t.nbytes) for t in m.tensors]
            meta = ckpt.metadata
            assert meta[SYNTH_KEY + "arch"] == arch and meta[SYNTH_KEY + "full_block_count"] == ARCHS[arch]["num_hidden_layers"]
            assert len(meta["tokenizer.ggml.tokens"]) == m.config["vocab_size"]
            for t in m.tensors:
                x = ckpt.get(t.name).numpy()
                assert np.isfinite(x).all(), t.name
                if t.role == "weight":  # std ~ 1/sqrt(K): activations stay O(1)
                    assert 0.5 < x.std() * np.sqrt(t.shape[-1]) < 2, (arch, t.name)


def test_same_seed_same_bytes_whatever_the_threads(tmp_path):
    a = write_synth(tmp_path / "a.gguf", "deepseek-v2-lite", 2, scale=SCALE, threads=1, progress=False).path
    b = write_synth(tmp_path / "b.gguf", "deepseek-v2-lite", 2, scale=SCALE, threads=2, progress=False).path
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("arch", ["deepseek-v3", "deepseek-v2-lite", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_two_layer_truncations_generate_in_tandem(files, arch):
    llm = LLM(files[arch], progress=False, max_context=64)
    g = llm.generate("Hello there", max_new_tokens=4, temperature=0)
    assert len(g.token_ids) == 4 and g.prompt_token_ids
    assert llm.generate([{"role": "user", "content": "hi"}], max_new_tokens=2).token_ids


def test_router_skew_makes_experts_hot(tmp_path):
    def hottest(skew):  # the hottest expert's top-8 rate over the uniform rate, Qwen3-30B's router shape
        w = small_f32("router", (128, 2048), (0, 1), skew)
        x = np.random.default_rng(0).standard_normal((2000, 2048)).astype(np.float32)
        top = np.argsort(-(x @ w.T), axis=1)[:, :8]
        return np.bincount(top.ravel(), minlength=128).max() / len(x) / (8 / 128)

    assert hottest(0.0) < 2.0
    assert hottest(8.0) > 5.0
    skewed = write_synth(tmp_path / "s.gguf", "qwen3-30b-a3b", 1, scale=8, router_skew=8, progress=False).path
    with GGUFCheckpoint.open(skewed) as ckpt:
        norms = np.linalg.norm(ckpt.get("blk.0.ffn_gate_inp.weight").numpy(), axis=1)
    assert norms.max() > 3 * np.median(norms)  # 1 + 8/(1 + r) over 16 experts


def test_convert_cli(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["convert", "--synth", "mixtral-8x7b", "--layers", "1", "--scale", "16", "-o", str(out)]) == 0
    assert out.is_file() and "mixtral-8x7b 1/32 layers" in capsys.readouterr().out
    assert main(["convert", "--synth", "deepseek-v3", "--layers", "99", "-o", str(out)]) == 2
    assert main(["convert", "--synth", "deepseek-v3", "-o", str(tmp_path / "x.bin")]) == 2
    assert capsys.readouterr().err.count("\n") == 2  # one line per error


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_loads_the_files(tmp_path):
    import llama_cpp

    # llama.cpp recognizes DeepSeek-V2-Lite (no q low-rank) by its 27 layers, so it gets them all.
    for arch, layers in (("deepseek-v3", 4), ("deepseek-v2-lite", 27), ("qwen3-30b-a3b", 2), ("mixtral-8x7b", 2)):
        path = write_synth(tmp_path / f"{arch}.gguf", arch, layers, scale=SCALE, progress=False).path
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_gpu_layers=0, verbose=False)
        llm.eval(llm.tokenize(b"Hello there"))
        del llm


@pytest.mark.slow
def test_full_width_v2_lite_two_layers_generates(tmp_path):
    """Real shapes (0.77 GB): write, load, generate."""
    w = write_synth(tmp_path / "v2l.gguf", "deepseek-v2-lite", 2, progress=False)
    assert w.nbytes == pytest.approx(plan("deepseek-v2-lite", 2).total_bytes, rel=0.01)
    g = LLM(w.path, progress=False, max_context=32).generate([1, 2, 3, 4], max_new_tokens=2, temperature=0)
    assert len(g.token_ids) == 2
