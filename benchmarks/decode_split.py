"""Where a GPU decode step's time goes, per MoE layer, from the CPU experts' own timestamps.

Loads a model on CUDA with CUDA graphs, decodes --steps greedy tokens after a --context-token
prompt one step at a time (each step synchronized, so its wall time is exact; nothing inside it
is), and splits every MoE layer of every step (after --skip warm-up steps) into:
  submit -> launch the engine's thread took the call and staged it (doorbell or host function)
  engine job       launch -> the last worker done (what DRAM bandwidth bounds)
  done -> answered the job's end until the stream was let go (a host function's wake-up;
                   ~0 through the doorbell, whose thread spins)
  gpu between      one layer's answer -> the next layer's ring: the GPU's part of a layer
                   (attention, router, norms, staging), which the CPU experts cannot overlap
and every step into its MoE layers and the two ends around them (with --users N, N requests decode
together: only the steps serving all N are measured, each layer's call carrying N tokens):
  step -> layer 1  the step's start (host: scheduling, static inputs, graph launch) until the
                   first MoE layer rang (GPU: embedding, dense layers, its attention)
  last -> step end the last MoE layer's answer until the step returned (GPU: norm, head;
                   host: sampling's sync, bookkeeping, detokenizing)
Prints medians / p90 per layer (the ends: per step) and the sum per step, and the decode rate;
--json writes them.
Compare the stream paths with TANDEM_HOST_FUNCS=1 (host functions instead of the doorbell) or
other environment overrides, in the same run, on the same machine.

    tandem convert --synth deepseek-v2-lite -o /dev/shm/v2-lite.gguf
    python benchmarks/decode_split.py /dev/shm/v2-lite.gguf --threads 14
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from tandem.bench.profile import layer_split
from tandem.layers.cpu_experts import CpuExperts
from tandem.runtime.llm import LLM
from tandem.runtime.sampling import SamplingParams

ROWS = ("submit -> launch", "engine job", "done -> answered", "gpu between")  # of bench.profile.layer_split
ENDS = ("step -> layer 1", "last -> step end")


def measure(path: str, threads: int, context: int, steps: int, skip: int, users: int = 1) -> dict:
    # No look-ahead: each step is timed and split alone (a queued next step would run inside it).
    llm = LLM(path, device="cuda", cpu_threads=threads, cuda_graph=True, max_context=context + steps + skip + 8,
              max_batch=users, progress=False, show_plan=False, look_ahead=False)
    experts = [m for m in llm.model.modules() if isinstance(m, CpuExperts)]
    if not experts:
        raise SystemExit("this model has no MoE layer on the CPU engine: nothing to split")
    engine = llm.engine
    vocab = engine.tokenizer.vocab_size
    # Each user's prefill samples its first token; then skip + steps decode steps of all users at once.
    for u in range(users):
        prompt = [(i + 7919 * u) % vocab for i in range(100, 100 + context)]
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_new_tokens=1 + skip + steps, ignore_eos=True))
    rows = {k: [] for k in ROWS + ENDS}
    step_s, n = [], 0
    while engine.has_work():
        t0 = time.monotonic_ns()  # the clock of the calls' stamps (steady_clock)
        outs = engine.step()
        torch.cuda.synchronize()
        t1 = time.monotonic_ns()
        if len(outs) < users or any(o.is_prefill for o in outs):
            continue  # a prefill step, or a batch still filling or draining
        n += 1
        if n <= skip:  # warm-up decodes (the batch's graph is captured on its first)
            continue
        step_s.append((t1 - t0) / 1e9)
        calls = [e.latest_call() for e in experts]
        rows["step -> layer 1"].append(calls[0].times_ns[0] - t0)
        rows["last -> step end"].append(t1 - calls[-1].times_ns[2])
        for key, times in layer_split(calls).items():
            if key in rows:
                rows[key] += times
    if not step_s:
        raise SystemExit(f"no decode step of all {users} users was measured: raise --steps")
    med = statistics.median(step_s)
    out = {"model": path, "threads": threads, "context": context, "users": users, "steps": len(step_s),
           "doorbell": experts[0].engine.doorbell is not None, "step_ms": 1e3 * med, "tok_s": users / med,
           "layers": len(experts), "per_layer_us": {}, "per_step_ms": {}}
    for k, v in rows.items():
        v.sort()
        out["per_layer_us"][k] = {"median": v[len(v) // 2] / 1e3, "p90": v[int(0.9 * (len(v) - 1))] / 1e3}
        out["per_step_ms"][k] = sum(v) / len(step_s) / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a GGUF file or model directory")
    p.add_argument("--threads", type=int, default=None, help="CPU engine threads (default: the runtime's)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=64, help="decode steps measured")
    p.add_argument("--skip", type=int, default=4, help="decode steps first, not measured")
    p.add_argument("--users", type=int, default=1, help="requests decoding together (one step serves all)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_split needs a CUDA GPU (it splits the stream's calls into the CPU engine)")
    if args.users < 1:
        raise SystemExit("--users must be >= 1")
    r = measure(args.model, args.threads, args.context, args.steps, args.skip, args.users)
    print(f"{r['model']}: {r['layers']} MoE layers, {r['threads'] or 'default'} threads, "
          f"{'doorbell' if r['doorbell'] else 'host functions'}, {r['users']} user(s) decoding after {r['context']} tokens")
    print(f"  {'':18s} {'median us':>10s} {'p90 us':>10s} {'ms / step':>10s}")
    for k in ROWS + ENDS:
        layer = r["per_layer_us"][k]  # ENDS: once a step
        print(f"  {k:18s} {layer['median']:10.1f} {layer['p90']:10.1f} {r['per_step_ms'][k]:10.2f}")
    print(f"  step {r['step_ms']:.2f} ms (median of {r['steps']}) -> {r['tok_s']:.1f} tok/s (all users)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
