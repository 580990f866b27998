"""Decode time per token against the VRAM given to hot experts (issue 11's curve), beside its model.

For each model and each budget (a fraction of every MoE layer's experts kept hot on the GPU):
load it with `--gpu-experts N`, decode --decode-tokens greedy tokens after a --context prompt
(median of --repeats), and measure s, the share of routed (token, expert) slots the hot experts
served while decoding (from the layers' online routing counts; every expert of a layer has the
same bytes, so it is also the share of expert bytes per token moved off the CPU).

The model the measurement is held to: time per token <= 1.1 x (t_GPU + (1 - s) x t_CPU), where
t_CPU is the CPU experts' time per token without hot experts (the engine's jobs and wake-ups in
`tandem bench --profile`'s stream split; medians of --repeats splits) and t_GPU the rest of that
step ("ratio"); and, since
the hot experts' own GPU time is not in that t_GPU, also with each budget's own t_GPU, its step
minus its own engine time ("own": holds the CPU side alone, t_CPU shrinking with 1 - s). Only on
a GPU (the split needs the experts' calls on a CUDA stream); elsewhere the curve is measured alone.

    tandem convert --synth deepseek-v2-lite -o /dev/shm/v2-lite.gguf
    tandem convert --synth deepseek-v2-lite --router-skew 8 -o /dev/shm/v2-lite-skew.gguf
    python benchmarks/hot_experts_curve.py /dev/shm/v2-lite.gguf /dev/shm/v2-lite-skew.gguf \\
        --device cuda --threads 14 --json hot.json --plot hot.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tandem.bench.profile import stream_split
from tandem.layers.hot_experts import HotExperts
from tandem.layers.moe import MoE
from tandem.runtime.llm import LLM

SLACK = 1.1  # the allowance over the model


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def experts_per_layer(llm: LLM) -> int:
    return next(m.cfg.num_experts for m in llm.model.modules() if isinstance(m, MoE))


def hot_share(llm: LLM) -> float:
    """Share of the routed slots counted since the last reset that hot experts served."""
    hot = total = 0
    for m in llm.model.modules():
        if isinstance(m, HotExperts):
            counts = m.counts.cpu()
            hot += int(counts[m.hot_ids].sum())
            total += int(counts.sum())
    return hot / total if total else 0.0


def reset_counts(llm: LLM) -> None:
    for m in llm.model.modules():
        if isinstance(m, HotExperts):
            m.counts.zero_()


def measure(path: str, n_hot: int, args, rng: np.random.Generator) -> dict:
    # No look-ahead: the stream split that gives t_CPU and t_GPU reads each step's calls when it
    # ended, so the steps measured against it must not overlap the host's work either.
    llm = LLM(path, device=args.device, cpu_threads=args.threads, gpu_experts=n_hot, max_batch=1, look_ahead=False,
              max_context=args.context + args.decode_tokens + 16, progress=False, show_plan=False)
    prompt = rng.integers(0, llm.tokenizer.vocab_size, args.context).tolist()
    try:
        llm.generate(prompt[:16], max_new_tokens=4, temperature=0.0, ignore_eos=True)  # warm up (graphs, kernels)
        rates, shares = [], []
        for _ in range(args.repeats):
            reset_counts(llm)
            g = llm.generate(prompt, max_new_tokens=args.decode_tokens + 1, temperature=0.0, ignore_eos=True)
            rates.append(g.decode_tok_s)
            shares.append(hot_share(llm))
        row = {"model": path, "hot_per_layer": n_hot, "experts": experts_per_layer(llm),
               "tok_s": statistics.median(rates), "s": statistics.median(shares)}
        row["ms_per_token"] = 1e3 / row["tok_s"]
        row.update(own_split(llm, prompt, args.decode_tokens, row["ms_per_token"], args.repeats))
        return row
    finally:
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def own_split(llm: LLM, prompt: list[int], n: int, ms_per_token: float, repeats: int = 1) -> dict:
    """This budget's t_CPU and t_GPU per token from its own stream split (GPU only): the engine's
    jobs and wake-ups, and the rest of the step; the medians of `repeats` splits (one split's t_GPU
    moved 3.4-3.8 ms between runs on one box, session 15; every reading is kept in t_gpu_ms_runs).
    With every expert hot the engine is never called: t_CPU 0, the whole step GPU."""
    if llm.engine.runner.device.type != "cuda":
        return {}
    hot = [m for m in llm.model.modules() if isinstance(m, HotExperts)]
    if hot and all(m.all_hot for m in hot):
        return {"t_cpu_ms": 0.0, "t_gpu_ms": ms_per_token}
    t_cpu, t_gpu = [], []
    for _ in range(max(1, repeats)):
        split = stream_split(llm, prompt, n)
        if split is None:
            return {}
        ms = split["ms_per_step"]
        t_cpu.append(ms["engine jobs"] + ms["wake-up after a job"])
        t_gpu.append(split["wall_ms_per_step"] - t_cpu[-1])
    return {"t_cpu_ms": statistics.median(t_cpu), "t_gpu_ms": statistics.median(t_gpu), "t_gpu_ms_runs": t_gpu}


def save(args, rows: list[dict]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "slack": SLACK, "rows": rows}, indent=1))


def hold_to_model(row: dict, base: dict) -> None:
    """row's model time from the no-hot row's split (base), and whether row is within SLACK of it.
    A split whose CPU part exceeds the whole step (t_GPU < 0) is wrong, not a loose bound: the row
    is then not within, with the reason, and no ratio.

    Two readings of t_GPU. `model_ms` / `ratio` / `within`: the no-hot step's GPU part, so the hot
    experts' own GPU time counts against the row (at 100% hot it is all of the difference).
    `model_own_ms` / `ratio_own` / `within_own` (rows with their own split): the row's own GPU part,
    hot experts included, so what is held is the CPU side: t_CPU at this budget against (1 - s) of
    the no-hot t_CPU."""
    row["model_ms"] = base["t_gpu_ms"] + (1 - row["s"]) * base["t_cpu_ms"]
    if base["t_gpu_ms"] < 0 or row["model_ms"] <= 0:
        row["within"] = False
        row["split_error"] = (f"t_CPU {base['t_cpu_ms']:.2f} ms exceeds the step "
                              f"({base['t_cpu_ms'] + base['t_gpu_ms']:.2f} ms): the stream split is wrong")
        return
    row["ratio"] = row["ms_per_token"] / row["model_ms"]
    row["within"] = row["ratio"] <= SLACK
    if row.get("t_gpu_ms", -1.0) >= 0:
        row["model_own_ms"] = row["t_gpu_ms"] + (1 - row["s"]) * base["t_cpu_ms"]
        row["ratio_own"] = row["ms_per_token"] / row["model_own_ms"]
        row["within_own"] = row["ratio_own"] <= SLACK


def curve(path: str, args, done: list[dict]) -> list[dict]:
    """The budgets in ascending order, 0 first (its run gives the expert count and t_CPU / t_GPU).
    Every row is saved to --json as soon as it is measured (`done`: the other models' rows), so a
    run cut short keeps what it measured."""
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []
    for fraction in sorted({0.0, *args.fractions}):
        n_hot = round(fraction * rows[0]["experts"]) if rows else 0
        log(f"{Path(path).name}: {n_hot} hot experts per layer ...")
        row = measure(path, n_hot, args, rng)
        row["fraction"] = fraction
        rows.append(row)
        base = rows[0]
        if "t_cpu_ms" in base:
            hold_to_model(row, base)
        log(f"  {row['tok_s']:.1f} tok/s, s = {row['s']:.2f}" + (f", ratio {row['ratio']:.2f}" if "ratio" in row else ""))
        save(args, done + rows)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':24s} {'hot/layer':>9s} {'budget':>7s} {'s':>5s} {'tok/s':>8s} {'ms/tok':>8s} {'model ms':>9s} "
            f"{'ratio':>6s} {'own':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        model = f"{r['model_ms']:9.2f}" if "model_ms" in r else f"{'-':>9s}"
        ratio = f"{r['ratio']:6.2f}" if "ratio" in r else f"{'-':>6s}"
        own = f"{r['ratio_own']:6.2f}" if "ratio_own" in r else f"{'-':>6s}"
        lines.append(f"{Path(r['model']).name[:24]:24s} {r['hot_per_layer']:9d} {r['fraction']:7.0%} "
                     f"{r['s']:5.2f} {r['tok_s']:8.1f} {r['ms_per_token']:8.2f} {model} {ratio} {own}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == model]
        x = [100 * r["fraction"] for r in mine]
        ax.plot(x, [r["ms_per_token"] for r in mine], "o-", color=f"C{i}", label=f"{Path(model).name} measured")
        if all("ratio" in r for r in mine):  # a wrong split (split_error) draws no model
            ax.plot(x, [SLACK * r["model_ms"] for r in mine], "--", color=f"C{i}",
                    label=f"{Path(model).name}: 1.1 x (t_GPU + (1 - s) t_CPU)")
        if all("ratio_own" in r for r in mine):
            ax.plot(x, [SLACK * r["model_own_ms"] for r in mine], ":", color=f"C{i}",
                    label=f"{Path(model).name}: the same with each budget's own t_GPU")
    ax.set_xlabel("experts per layer kept on the GPU (%)")
    ax.set_ylabel("decode ms per token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fractions(value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0,0.25,0.5,1, got {value!r}") from None
    if not out or any(not 0 <= f <= 1 for f in out):
        raise argparse.ArgumentTypeError(f"fractions must be in 0..1, got {value!r}")
    return sorted(set(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="GGUF models (e.g. one synthesized with and one without --router-skew)")
    p.add_argument("--fractions", type=fractions, default=[0.0, 0.25, 0.5, 1.0],
                   help="share of each layer's experts kept hot (default 0,0.25,0.5,1; 0 always runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU expert engine threads")
    p.add_argument("--context", type=int, default=256, help="prompt tokens before the timed decode")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="write the curve as a PNG here (needs matplotlib)")
    p.add_argument("--from-json", help="measure nothing: print and plot the rows of an earlier --json "
                   "(e.g. plot a GPU machine's run where matplotlib is installed)")
    args = p.parse_args(argv)
    if args.from_json:
        if args.models:
            p.error("--from-json replaces the models")
        rows = json.loads(Path(args.from_json).read_text())["rows"]
        print(table(rows))
        if args.plot:
            plot(rows, args.plot)
        return 0
    if not args.models:
        p.error("give the models to measure (or --from-json)")
    if args.context < 1 or args.decode_tokens < 1 or args.repeats < 1:
        p.error("--context, --decode-tokens and --repeats must be >= 1")
    start = time.perf_counter()
    rows: list[dict] = []
    for path in args.models:
        rows += curve(path, args, rows)
    print(table(rows))
    save(args, rows)
    if args.plot:
        plot(rows, args.plot)
    log(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
