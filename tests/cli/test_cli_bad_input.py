"""Bad flag values and paths (found by fuzzing the CLI): one `error:` line and exit status 2, never a
traceback, and before any model loads or benchmark runs."""

import json
import shutil
import subprocess
import sys

import pytest

from tandem.cli.main import main
from tandem.testing.tiny import write_tiny

LONG = "a" * 300  # one path component longer than NAME_MAX: the OS refuses to look it up (ENAMETOOLONG)
CONVERT = ["convert", "--synth", "deepseek-v3", "--scale", "16", "--layers", "4"]
BENCH = ["bench", "{model}", "--prompts", "8", "--context", "8", "--decode-tokens", "2", "--repeats", "1",
         "--bw-gb", "0.01"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("m"), "deepseek_v3")


def run(argv, model, tmp_path) -> int:
    return main([str(a).format(model=model, tmp=tmp_path) for a in argv])


@pytest.mark.parametrize(
    "argv, message",
    [
        # --threads: torch.set_num_threads raised (negative, overflow) or crashed; 0 was silently ignored
        (["generate", "{model}", "--prompt", "hi", "--threads", "-1"], "--threads must be in 1.."),
        (["generate", "{model}", "--prompt", "hi", "--threads", "0"], "--threads must be in 1.."),
        (["chat", "{model}", "--threads", str(10**30)], "--threads must be in 1.."),
        (["serve", "{model}", "--port", "0", "--threads", "-2"], "--threads must be in 1.."),
        # --device: torch.device("foo") raised before the placement's own check
        (["generate", "{model}", "--prompt", "hi", "--device", "foo"], "--device 'foo' is not supported"),
        (["chat", "{model}", "--device", ""], "--device '' is not supported"),
        # budgets: int(inf * GB) raised OverflowError
        (["generate", "{model}", "--prompt", "hi", "--vram-budget", "inf"], "--vram-budget must be a positive number"),
        (["generate", "{model}", "--prompt", "hi", "--ram-budget", "1e308"], "--ram-budget must be a positive number"),
        # paths the OS refuses to look up raised OSError from Path.is_file
        (["generate", LONG, "--prompt", "hi"], "File name too long"),
        (["inspect", LONG], "File name too long"),
        (["inspect", "{tmp}/e.gguf", "--config-dir", LONG], "--config-dir"),
        (["eval", "ppl", LONG], "File name too long"),
        (["inspect", ""], "model path is empty"),  # was read as "." (the current folder)
        # eval: 0 and negatives were silently taken as "default" (or dropped the last token)
        (["eval", "ppl", "--window", "1"], "--window must be >= 2"),
        (["eval", "ppl", "--stride", "0"], "--stride must be in 1..--window (512), got 0"),
        (["eval", "ppl", "--max-tokens", "-1"], "--max-tokens must be >= 2"),
        (["eval", "ppl", "/nonexistent/model"], "does not exist"),  # said "ships no heldout.txt"
        (["eval", "ppl", "--text", "/nonexistent.txt"], "cannot read text file"),
        (["eval", "compare", "{model}", "--text", "{model}/config.json", "--json", "{tmp}"], "is a folder"),
        (["eval", "compare", "{model}", "--text", "{model}/config.json", "--json", "/nonexistent/r.json"],
         "does not exist"),
        # convert: struct.error / OverflowError / ValueError from the GGUF writer and its thread pool
        ([*CONVERT, "-o", "{tmp}/x.gguf", "--seed", "-1"], "--seed must be in 0..4294967295"),
        ([*CONVERT, "-o", "{tmp}/x.gguf", "--seed", str(2**70)], "--seed must be in 0..4294967295"),
        ([*CONVERT, "-o", "{tmp}/x.gguf", "--router-skew", "1e308"], "--router-skew must be in 0.."),
        ([*CONVERT, "-o", "{tmp}/x.gguf", "--router-skew", "nan"], "--router-skew must be in 0.."),
        ([*CONVERT, "-o", "{tmp}/x.gguf", "--scale", str(10**20)], "--scale must be in 1..256"),
        ([*CONVERT, "-o", "{tmp}/x.gguf", "--threads", "-1"], "--threads must be in 1.."),
        ([*CONVERT, "-o", "{tmp}/x.gguf", "--threads", "0"], "--threads must be in 1.."),
        ([*CONVERT, "-o", "{tmp}/d.gguf"], "is a folder"),  # IsADirectoryError after writing all of it
        ([*CONVERT, "-o", f"{{tmp}}/{LONG}.gguf"], "File name too long"),
        ([*CONVERT, "-o", "/proc/x.gguf"], "cannot write /proc/x.gguf"),  # the writer cannot create the file
        # bench: these failed with a traceback, several of them only after the whole measurement
        ([*BENCH, "--bw-gb", "nan"], "--bw-gb must be > 0"),
        ([*BENCH, "--bw-gb", "inf"], "--bw-gb must be > 0"),
        ([*BENCH, "--bw-gb", "1e9"], "--bw-gb must be > 0 and fit in the RAM"),  # std::bad_alloc
        ([*BENCH, "--threads", "-1"], "--threads must be in 1.."),
        ([*BENCH, "--threads", "0"], "--threads must be in 1.."),  # was reported as --cpu-threads
        ([*BENCH, "--device", "foo"], "--device 'foo' is not supported"),
        ([*BENCH, "--seed", "-1"], "--seed must be >= 0"),
        ([*BENCH, "--json", "{tmp}"], "--json"),
        ([*BENCH, "--json", "/nonexistent/b.json"], "does not exist"),
        ([*BENCH, "--plot", "/nonexistent/b.png"], "does not exist"),
        ([*BENCH, "--plot", "{tmp}/b.txt"], "--plot cannot write .txt files"),
        ([*BENCH, "--full-layers", "5"], "--full-layers"),  # was silently ignored without --extrapolate
        (["bench", "--extrapolate", LONG, "{model}"], "File name too long"),
    ],
)
def test_bad_input_is_one_line(argv, message, model, tmp_path, capsys):
    if "--plot" in argv:
        pytest.importorskip("matplotlib")
    (tmp_path / "d.gguf").mkdir()
    (tmp_path / "e.gguf").touch()
    assert run(argv, model, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("config", ["{not json", json.dumps({"architectures": ["DeepseekV3ForCausalLM"]})])
def test_eval_compare_reads_the_config_safely(config, model, tmp_path, capsys):
    broken = tmp_path / "m"
    shutil.copytree(model, broken)
    (broken / "config.json").write_text(config)
    assert main(["eval", "compare", str(broken), "--text", str(model / "config.json")]) == 2
    err = capsys.readouterr().err  # was JSONDecodeError / KeyError: 'num_experts_per_tok'
    assert err.startswith("error: ") and "config.json" in err and err.count("\n") == 1, err


def test_convert_still_writes_with_valid_flags(tmp_path, capsys):
    out = tmp_path / "ok.gguf"
    assert main([*CONVERT, "-o", str(out), "--seed", str(2**32 - 1), "--threads", "1", "--router-skew", "8"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["inspect", "{model}"],
                                  ["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "20"]])
def test_a_reader_that_leaves_early_is_no_traceback(argv, model):
    """`tandem ... | head`: the pipe closes before the output; exit quietly as a Unix filter does."""
    cmd = [sys.executable, "-m", "tandem", *(a.format(model=model) for a in argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the child has written anything
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_calibrate_needs_gpu_experts_and_a_readable_file(tmp_path, capsys):
    # It was read only with --gpu-experts: alone, or naming a missing file, it passed silently.
    from tandem.cli.main import main
    from tandem.testing.tiny import write_tiny

    model = write_tiny(tmp_path / "m", "deepseek_v3", seed=4)
    assert main(["generate", str(model), "--prompt", "x", "--calibrate", str(tmp_path / "none.txt")]) == 2
    assert "give --gpu-experts" in capsys.readouterr().err
    assert main(["generate", str(model), "--prompt", "x", "--gpu-experts", "1", "--calibrate",
                 str(tmp_path / "none.txt")]) == 2
    assert "cannot read --calibrate file" in capsys.readouterr().err
