"""Where a graph decode step's (or one prefill step's) GPU time goes, kernel by kernel.

Loads a model on CUDA with CUDA graphs, prefills a --context-token prompt (short enough to stay
off the dual-path prefill, whose first use compiles its kernels), decodes --warmup steps (the
graph is captured on the first), then records --steps decode steps (each synchronized, no
look-ahead) with torch's profiler: CUPTI reports the kernels inside a replayed graph one by one.
Prints, per kernel name, launches a step, mean us and ms a step; then one middle step's timeline
(each kernel's duration and the gap before it), where the CPU experts' jobs show as the long gaps
between a layer's to_host and the next layer's from_host. --json writes both.
`benchmarks/decode_split.py` splits the same steps by the engine's own timestamps instead.

--prefill N records one N-token prefill step instead (after --warmup prompts of the same length,
which compile the dual path's kernels and teach its split): its wall time unprofiled and
profiled, the time some kernel ran (overlapping streams counted once), the kernels per name,
and the host's operators by their own time (the dual path's syncs, splits and copies).

    tandem convert --synth deepseek-v2-lite -o /dev/shm/v2-lite.gguf
    python benchmarks/decode_kernels.py /dev/shm/v2-lite.gguf --threads 14
    python benchmarks/decode_kernels.py /dev/shm/v2-lite.gguf --threads 14 --prefill 8192 --warmup 2
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    start: float  # us, the profiler's clock
    end: float
    name: str


def summarize(kernels: list[Kernel], steps: int) -> dict:
    """`kernels` of `steps` identical decode steps (in any order) -> per-name rows (launches a step,
    mean us, ms a step; most time first), the device time a step, and the middle step's timeline
    [(gap before, us, name)] in start order."""
    if steps < 1 or not kernels:
        raise ValueError(f"nothing to summarize: {len(kernels)} kernels over {steps} steps")
    if len(kernels) % steps:
        raise ValueError(f"{len(kernels)} kernels do not split into {steps} equal steps: the steps differ")
    times: dict[str, list[float]] = collections.defaultdict(list)
    for k in kernels:
        times[k.name].append(k.end - k.start)
    rows = [{"name": name, "per_step": len(v) / steps, "mean_us": sum(v) / len(v), "ms_per_step": sum(v) / steps / 1e3}
            for name, v in times.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    ordered = sorted(kernels, key=lambda k: (k.start, k.end))
    per = len(ordered) // steps
    middle = ordered[(steps // 2) * per : (steps // 2 + 1) * per]
    timeline, prev = [], middle[0].start
    for k in middle:
        timeline.append((k.start - prev, k.end - k.start, k.name))
        prev = k.end
    return {"steps": steps, "kernels_per_step": per, "device_ms_per_step": sum(r["ms_per_step"] for r in rows),
            "middle_span_ms": (middle[-1].end - middle[0].start) / 1e3, "rows": rows, "timeline": timeline}


def busy_ms(kernels: list[Kernel]) -> float:
    """Time some kernel ran, in ms: the union of the kernels' intervals (streams overlap)."""
    total, end = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k.start):
        if k.end > end:
            total += k.end - max(k.start, end)
            end = k.end
    return total / 1e3


def _engine(path: str, threads: int | None, max_context: int, **kw):
    """The model on CUDA with CUDA graphs, one sequence at a time, without look-ahead (a queued next
    step would run inside the one being recorded): its engine."""
    from tandem.runtime.llm import LLM

    return LLM(path, device="cuda", cpu_threads=threads, cuda_graph=True, max_batch=1, progress=False,
               max_context=max_context, show_plan=False, look_ahead=False, **kw).engine


def _device_kernels(prof) -> list[Kernel]:
    """The kernels (and copies) a torch profiler recorded on the GPU."""
    import torch

    return [Kernel(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def measure(path: str, threads: int | None, context: int, warmup: int, steps: int, max_context: int) -> list[Kernel]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tandem.runtime.sampling import SamplingParams

    engine = _engine(path, threads, max(max_context, context + warmup + steps + 16))
    vocab = engine.tokenizer.vocab_size
    prompt = [(100 + i) % vocab for i in range(context)]
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_new_tokens=1 + warmup + steps, ignore_eos=True))
    for _ in range(1 + warmup):  # the prefill, then the warm-up decodes
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
            torch.cuda.synchronize()
    return _device_kernels(prof)


def measure_prefill(path: str, threads: int | None, tokens: int, warmup: int) -> dict:
    """One `tokens`-token prefill step after `warmup` prompts of that length: kernels, host operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tandem.runtime.sampling import SamplingParams

    engine = _engine(path, threads, tokens + 16, max_step_tokens=tokens)
    vocab = engine.tokenizer.vocab_size

    def prefill(seed: int) -> float:
        """One prompt's prefill (one step: the prompt fits the step) and its first token; ms of the step."""
        engine.add_request([(seed + 7 * i) % vocab for i in range(tokens)],
                           SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        while engine.has_work():
            engine.step()
        return ms

    for w in range(warmup):
        prefill(11 + w)
    wall = prefill(101)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        profiled = prefill(211)
    kernels = _device_kernels(prof)
    host = sorted((a for a in prof.key_averages() if a.self_cpu_time_total > 0), key=lambda a: -a.self_cpu_time_total)
    return {"tokens": tokens, "wall_ms": wall, "wall_ms_profiled": profiled, "kernels": kernels,
            "host": [{"name": a.key, "count": a.count, "self_ms": a.self_cpu_time_total / 1e3} for a in host]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a GGUF file or model directory")
    p.add_argument("--threads", type=int, default=None, help="CPU engine threads (default: the runtime's)")
    p.add_argument("--context", type=int, default=100, help="prompt tokens before decoding (default 100)")
    p.add_argument("--warmup", type=int, default=9, help="decode steps first, not recorded")
    p.add_argument("--steps", type=int, default=12, help="decode steps recorded")
    p.add_argument("--max-context", type=int, default=400,
                   help="the model's context, which sets the attention's splits in the graph (default 400)")
    p.add_argument("--top", type=int, default=30, help="kernel names listed")
    p.add_argument("--timeline", type=int, default=90, help="kernels of the middle step's timeline printed")
    p.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="record one N-token prefill step instead of decode steps (--warmup: prompts first)")
    p.add_argument("--json", help="write the rows and the timeline here")
    args = p.parse_args(argv)
    if min(args.context, args.steps) < 1 or args.warmup < 0 or args.prefill < 0:
        raise SystemExit("--context and --steps must be >= 1, --warmup and --prefill >= 0")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("decode_kernels needs a CUDA GPU")
    if args.prefill:
        return prefill_report(args)
    kernels = measure(args.model, args.threads, args.context, args.warmup, args.steps, args.max_context)
    r = summarize(kernels, args.steps)
    print(f"{args.model}: {r['kernels_per_step']} device events a step, {r['device_ms_per_step']:.3f} ms of them; "
          f"the middle step spans {r['middle_span_ms']:.3f} ms")
    print(f"{'name':70s} {'per step':>8s} {'mean us':>8s} {'ms/step':>8s}")
    for row in r["rows"][: args.top]:
        print(f"{row['name'][:70]:70s} {row['per_step']:8.1f} {row['mean_us']:8.2f} {row['ms_per_step']:8.3f}")
    print("middle step: gap before (us), duration (us), kernel")
    for gap, us, name in r["timeline"][: args.timeline]:
        print(f"  {gap:8.1f} {us:8.1f}  {name[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


def prefill_report(args) -> int:
    m = measure_prefill(args.model, args.threads, args.prefill, args.warmup)
    r = summarize(m["kernels"], 1)
    busy = busy_ms(m["kernels"])
    print(f"{args.model}: one {m['tokens']}-token prefill step: {m['wall_ms']:.1f} ms ({m['wall_ms_profiled']:.1f} "
          f"profiled); some kernel ran {busy:.1f} ms of it, {len(m['kernels'])} kernels summing "
          f"{r['device_ms_per_step']:.1f} ms")
    print(f"{'kernel':70s} {'count':>8s} {'mean us':>8s} {'ms':>8s}")
    for row in r["rows"][: args.top]:
        print(f"{row['name'][:70]:70s} {row['per_step']:8.0f} {row['mean_us']:8.2f} {row['ms_per_step']:8.3f}")
    print(f"{'host operator (own time)':70s} {'count':>8s} {'':>8s} {'ms':>8s}")
    for h in m["host"][: args.top]:
        print(f"{h['name'][:70]:70s} {h['count']:8d} {'':>8s} {h['self_ms']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": m["tokens"], "wall_ms": m["wall_ms"], "wall_ms_profiled": m["wall_ms_profiled"],
                       "busy_ms": busy, "rows": r["rows"], "host": m["host"]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
