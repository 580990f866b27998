"""The `tandem` command: chat, generate, inspect, and one-line errors for user mistakes."""

import io
import json
import re
import subprocess
import sys

import pytest
import torch

from tandem.cli.main import main
from tandem.testing.tiny import write_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("m"), "deepseek_v2", seed=4)


def run(argv, monkeypatch=None, stdin: str = ""):
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main([str(a) for a in argv])


def test_chat_without_model_runs_the_demo_in_a_fresh_process():
    proc = subprocess.run(
        [sys.executable, "-m", "tandem", "chat", "--max-new-tokens", "5"],
        input="hello\n/clear\nsecond question\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    stats = [line for line in proc.stdout.splitlines() if line.startswith("[prefill")]
    assert len(stats) == 2 and all("tok/s" in s for s in stats)
    assert "demo model" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_keeps_history_and_clear_forgets_it(model, monkeypatch, capsys):
    assert run(["chat", model, "--max-new-tokens", "3", "--temperature", "0"], monkeypatch, "hi\nhi\n/clear\nhi\n") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[prefill")]
    sizes = [int(line.split()[1]) for line in lines]
    assert len(sizes) == 3 and sizes[1] > sizes[0] and sizes[2] == sizes[0]


def test_chat_prompt_file_is_the_first_message(model, monkeypatch, capsys, tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("a question from a file")
    assert run(["chat", model, "--prompt-file", f, "--max-new-tokens", "2"], monkeypatch, "") == 0
    assert capsys.readouterr().out.count("[prefill") == 1


def test_generate_prints_the_greedy_text(model, monkeypatch, capsys):
    from tandem.runtime.llm import LLM

    expected = LLM(model, progress=False).generate("def f(x):", max_new_tokens=6, temperature=0, ignore_eos=False).text
    assert run(["generate", model, "--prompt", "def f(x):", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "decode" in captured.err


def test_inspect_reports_parameters(model, capsys):
    assert run(["inspect", model]) == 0
    out = capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(model / "model.safetensors", "pt") as f:
        total = sum(f.get_slice(n).get_shape().__len__() and torch.Size(f.get_slice(n).get_shape()).numel() for n in f.keys())
    assert "DeepseekV2ForCausalLM" in out and f"{total:,} total" in out
    assert "3 (1 dense, 2 MoE)" in out and "8 (top-3)" in out


def broken_model(kind: str, src, tmp_path):
    import shutil

    dst = tmp_path / kind
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if kind == "unknown_arch":
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    elif kind == "mismatch":
        cfg["moe_intermediate_size"] += 8
    elif kind == "no_weights":
        (dst / "model.safetensors").unlink()
    elif kind == "truncated":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "bad_json":
        (dst / "config.json").write_text("{not json")
        return dst
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "kind, message",
    [
        ("unknown_arch", "unsupported model architecture"),
        ("mismatch", "config/weights mismatch"),
        ("no_weights", "safetensors"),
        ("truncated", "truncated"),
        ("bad_json", "not valid JSON"),
    ],
)
def test_broken_models_fail_with_one_clear_line(kind, message, model, tmp_path, capsys):
    path = broken_model(kind, model, tmp_path)
    assert run(["generate", path, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "/nonexistent/model", "--prompt", "hi"], "does not exist"),
        (["generate", "{model}", "--prompt", ""], "prompt is empty"),
        (["generate", "{model}", "--prompt", "word " * 200, "--max-context", "32"], "context window is 32"),
        (["generate", "{model}", "--prompt-file", "/nonexistent.txt"], "cannot read prompt file"),
        (["generate", "{model}", "--prompt", "hi", "--temperature", "-2"], "temperature"),
        (["generate", "{model}", "--prompt", "hi", "--max-context", "999999"], "out of range"),
        (["generate", "{model}", "--prompt", "hi", "--max-step-tokens", "0"], "--max-step-tokens must be >= 1"),
        (["chat", "{model}", "--max-step-tokens", "-5"], "--max-step-tokens must be >= 1"),
        (["inspect", "/nonexistent/model"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, model, capsys):
    assert run([a.format(model=model) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_experts_backend_flag(model, backend, capsys):
    argv = ["generate", model, "--prompt", "hi", "--max-new-tokens", "3", "--experts", backend, "--cpu-threads", "1"]
    assert run(argv) == 0
    assert "decode" in capsys.readouterr().err


def test_bad_cpu_threads_is_one_line(model, capsys):
    assert run(["generate", model, "--prompt", "hi", "--cpu-threads", "0"]) == 2
    assert "--cpu-threads must be >= 1" in capsys.readouterr().err


STATS = re.compile(r"^\[prefill (\d+) tok, TTFT ([\d.]+) ms, ([\d.]+) tok/s \| decode (\d+) tok, ([\d.]+) tok/s \| (\w+)\]$")


def test_chat_stats_line_reports_ttft_and_rates(model, monkeypatch, capsys):
    assert run(["chat", model, "--max-new-tokens", "4", "--temperature", "0"], monkeypatch, "hello there\n") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[prefill")]
    assert len(lines) == 1 and "\033" not in lines[0]  # plain text when stdout is not a terminal
    match = STATS.match(lines[0])
    assert match, lines[0]
    prompt, ttft_ms, prefill_rate, decoded, decode_rate = (float(g) for g in match.groups()[:5])
    assert prompt > 0 and ttft_ms > 0 and 1 <= decoded <= 4 and decode_rate >= 0
    assert prefill_rate == pytest.approx(prompt / ttft_ms * 1e3, rel=0.05)  # TTFT printed to 3+ digits


def test_max_step_tokens_reaches_the_scheduler(model, monkeypatch, capsys):
    from tandem.cli import chat

    built = []

    class Spy(chat.LLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(chat, "LLM", Spy)
    argv = ["generate", model, "--prompt", "one two three four five six seven", "--max-new-tokens", "3",
            "--max-step-tokens", "3"]
    assert run(argv) == 0  # a 3-token budget prefills the prompt in chunks and still answers
    assert built[0].engine.scheduler.max_step_tokens == 3
    assert "decode" in capsys.readouterr().err
    # Default "auto": the largest chunk whose workspace fits (this tiny model: the largest there is).
    assert run(argv[:-2]) == 0 and built[1].engine.scheduler.max_step_tokens == 2048


def test_cuda_graph_and_gpu_experts_flags_reach_the_llm(model, monkeypatch):
    from tandem.cli import chat

    seen = []

    class Spy(chat.LLM):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(chat, "LLM", Spy)
    argv = ["generate", model, "--prompt", "hi", "--max-new-tokens", "2"]
    assert run(argv + ["--no-cuda-graph", "--gpu-experts", "auto"]) == 0
    assert run(argv) == 0
    assert (seen[0]["cuda_graph"], seen[0]["gpu_experts"]) == (False, "auto")
    assert (seen[1]["cuda_graph"], seen[1]["gpu_experts"]) == (True, 0)


def test_kv_cache_int8_flag(model, capsys, tmp_path):
    from tandem.runtime.llm import LLM

    expected = LLM(model, progress=False, kv_cache="int8").generate("def f(x):", max_new_tokens=6, temperature=0).text
    assert run(["generate", model, "--prompt", "def f(x):", "--max-new-tokens", "6", "--temperature", "0",
                "--kv-cache", "int8"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    qwen = write_tiny(tmp_path, "qwen3_moe", seed=4)
    assert run(["generate", qwen, "--prompt", "x", "--kv-cache", "int8"]) == 2
    assert "int8 KV cache is implemented for MLA models" in capsys.readouterr().err


def test_chat_refuses_an_empty_prompt_file_before_loading(model, monkeypatch, capsys, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text(" \n")
    assert run(["chat", model, "--prompt-file", f], monkeypatch, "") == 2
    assert "is empty" in capsys.readouterr().err
