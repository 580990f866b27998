"""llama.cpp as a peer, measured in the same run: the `llama-bench` binary, or llama-cpp-python.

llama-bench (preferred): experts on the CPU as TARGETS.md measures it (`-ngl 99 -fa 1 -ot exps=CPU`
with a GPU, `-ngl 0` without), the same threads and prompt lengths, `-o json`. Prefill runs
`-p P1,P2,.. -n 0`; decode runs `-p 0 -n D -d C` (D tokens after a C-token context; a build too
old for -d is rerun without it, and the result says so). llama-cpp-python cannot keep experts on
the CPU while offloading the rest, so it serves CPU-only runs; with a GPU it is refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from tandem.errors import TandemError

NAME = "llama.cpp"


def _run(cmd: list[str]) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} failed: {' | '.join(tail)}")
    start = proc.stdout.find("[")
    return json.loads(proc.stdout[start:])


def llama_bench(binary: str, model: str, prompts, context: int, decode_tokens: int, threads: int,
                repeats: int, gpu: bool, ubatch: int = 2048) -> dict:
    """{prefill_tok_s: {P: tok/s}, decode_tok_s, commands, notes} from llama-bench's JSON."""
    base = [binary, "-m", model, "-t", str(threads), "-r", str(repeats), "-o", "json", "-fa", "1",
            "-b", str(max(ubatch, 2048)), "-ub", str(ubatch)]
    base += ["-ngl", "99", "-ot", "exps=CPU"] if gpu else ["-ngl", "0"]
    pre = base + ["-p", ",".join(str(p) for p in prompts), "-n", "0"]
    dec = base + ["-p", "0", "-n", str(decode_tokens), "-d", str(context)]
    out = {"name": NAME, "commands": [" ".join(pre), " ".join(dec)], "notes": []}
    out["prefill_tok_s"] = {int(r["n_prompt"]): float(r["avg_ts"]) for r in _run(pre) if int(r["n_prompt"]) > 0}
    try:
        recs = _run(dec)
    except RuntimeError:
        dec = dec[:-2]
        out["commands"][1] = " ".join(dec)
        out["notes"].append("this llama-bench has no -d: its decode starts from an empty context")
        recs = _run(dec)
    out["decode_tok_s"] = float(next(r["avg_ts"] for r in recs if int(r["n_gen"]) > 0))
    return out


def llama_cpp_python(model: str, prompts, context: int, decode_tokens: int, threads: int, repeats: int) -> dict:
    """CPU-only figures through llama-cpp-python's low-level eval (medians of `repeats`)."""
    import llama_cpp

    n_ctx = max(max(prompts), context + decode_tokens) + 16
    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=2048, n_gpu_layers=0, verbose=False)
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    out = {"name": NAME + " (llama-cpp-python, CPU)", "prefill_tok_s": {}, "notes": []}
    for p in prompts:
        times = []
        for _ in range(repeats):
            llm.reset()
            ids = rng.integers(0, vocab, size=p).tolist()
            t0 = time.perf_counter()
            llm.eval(ids)
            times.append(time.perf_counter() - t0)
        out["prefill_tok_s"][p] = p / float(np.median(times))
    rates = []
    for _ in range(repeats):
        llm.reset()
        llm.eval(rng.integers(0, vocab, size=context).tolist())
        t0 = time.perf_counter()
        for tok in rng.integers(0, vocab, size=decode_tokens).tolist():
            llm.eval([tok])
        rates.append(decode_tokens / (time.perf_counter() - t0))
    out["decode_tok_s"] = float(np.median(rates))
    return out


def measure_peer(peer: str, model: str, cfg, threads: int, gpu: bool, binary: str | None, log=print) -> dict | None:
    """The peer's figures, or None (with a log line saying why) when it is not available."""
    if peer != "llama.cpp":
        raise TandemError(f"unknown --peer {peer!r}; the supported peer is llama.cpp")
    if not str(model).endswith(".gguf"):
        log("peer skipped: llama.cpp needs a .gguf file")
        return None
    exe = binary or shutil.which("llama-bench")
    if exe and Path(exe).exists():
        log(f"peer: {exe}")
        try:
            return llama_bench(exe, model, cfg.prompts, cfg.context, cfg.decode_tokens, threads, cfg.repeats, gpu)
        except (RuntimeError, json.JSONDecodeError, KeyError, StopIteration) as e:
            log(f"peer skipped: llama-bench failed ({e})")
            return None
    if binary:
        raise TandemError(f"--llama-bench {binary} does not exist")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        log("peer skipped: no llama-bench on PATH (give --llama-bench PATH) and llama-cpp-python is not installed")
        return None
    if gpu:
        log("peer skipped: llama-cpp-python cannot keep experts on the CPU with a GPU (-ot); give --llama-bench")
        return None
    return llama_cpp_python(model, cfg.prompts, cfg.context, cfg.decode_tokens, threads, cfg.repeats)
