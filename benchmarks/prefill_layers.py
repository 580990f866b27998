"""Where a long prefill step's time goes around each MoE layer's routed experts (dual path).

Loads a model on CUDA with dual-path prefill, runs --prompts prompts of --tokens tokens (one step
each), and stamps, for every MoE layer of the last one: when the host entered the layer's expert
submit, when the layer's tokens-per-expert count reached the host (its one sync), when submit
returned, when the layer's wait returned (host steady-clock ns, time.monotonic_ns), the CPU
engine job's own launch and end (the same clock), and the device share's CUDA-event time. Per
layer and as means it prints:
  engine   the engine's job (launch -> end)
  device   the device share, submit -> its last run computed (its copies and compute)
  gap      the previous layer's engine end -> this layer's count on the host: the engine's answer
           back, the residual add, this layer's attention and routing, the count's trip
  split    count on the host -> the engine's launch: the host's split, submit, the doorbell
  submit   count on the host -> submit returned (the device share's runs queued)
A layer whose slots all went to the device has no engine job (its engine columns are blank).
The first prompts (all but the last) compile the kernels and teach the split its rates.

    tandem convert --synth deepseek-v2-lite -o /dev/shm/v2-lite.gguf
    python benchmarks/prefill_layers.py /dev/shm/v2-lite.gguf --tokens 512 --threads 14
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

COLUMNS = ("engine", "device", "gap", "split", "submit")


def layer_table(stamps: list[dict]) -> dict:
    """Stamps of one step's MoE layers in the order they ran -> per-layer rows (ms relative to the
    first layer's submit; the COLUMNS durations in ms, NaN where a layer lacks one) and their
    means over the layers that have them. A stamp: enter, sync, exit, w_exit (ns; sync may be None),
    launch, done (ns, None without an engine job), device_s (seconds or None), layer, ndev, runs."""
    if not stamps:
        raise ValueError("no MoE layer ran a long step: nothing to tabulate")
    base = stamps[0]["enter"]
    nan = float("nan")

    def ms(t):
        return (t - base) / 1e6 if t is not None else nan

    def span(a, b):
        return (b - a) / 1e6 if a is not None and b is not None else nan

    rows, prev_done = [], None
    for s in stamps:
        rows.append({
            "layer": s["layer"], "ndev": s["ndev"], "runs": s["runs"],
            "enter": ms(s["enter"]), "sync": ms(s["sync"]), "exit": ms(s["exit"]), "w_exit": ms(s.get("w_exit")),
            "launch": ms(s["launch"]), "done": ms(s["done"]),
            "engine": span(s["launch"], s["done"]),
            "device": s["device_s"] * 1e3 if s.get("device_s") else nan,
            "gap": span(prev_done, s["sync"]),
            "split": span(s["sync"], s["launch"]),
            "submit": span(s["sync"], s["exit"]),
        })
        prev_done = s["done"]
    means = {}
    for c in COLUMNS:
        have = [r[c] for r in rows if not math.isnan(r[c])]
        means[c] = {"ms": statistics.mean(have) if have else None, "layers": len(have)}
    return {"rows": rows, "means": means}


def measure(path: str, tokens: int, threads: int | None, prompts: int) -> tuple[list[float], list[dict]]:
    """The step times (ms) of `prompts` prompts and the last one's per-layer stamps."""
    import torch

    from tandem.bench.dual_split import dual_layers, settle
    from tandem.layers.dual_experts import DualExperts
    from tandem.layers.dual_rates import SharedRates
    from tandem.runtime.llm import LLM
    from tandem.runtime.sampling import SamplingParams

    llm = LLM(path, device="cuda", cpu_threads=threads, cuda_graph=True, max_batch=1, progress=False,
              max_context=tokens + 16, show_plan=False, look_ahead=False, max_step_tokens=tokens)
    engine, layers = llm.engine, dual_layers(llm.model)
    if not layers:
        raise SystemExit(f"{path}: no layer runs the dual path (experts in CPU RAM, a CUDA device)")
    stamps: list[dict] = []
    synced: dict[str, int] = {}
    submit, wait, learn_pending = DualExperts.submit, DualExperts.wait, SharedRates.learn_pending

    def stamped_submit(self, x, ids, w):
        enter = time.monotonic_ns()
        out = submit(self, x, ids, w)
        if x.shape[0] < self.min_tokens:  # a short step (decode) stays on the engine alone: not stamped
            return out
        step = self._step or {}
        stamps.append({"layer": self.cpu_experts.layer, "enter": enter, "sync": synced.pop("t", None),
                       "exit": time.monotonic_ns(), "call": step.get("call"), "ndev": len(self.last_split),
                       "runs": len(self.last_runs), "dual": self})
        return out

    def stamped_learn_pending(self):  # submit calls it right after the count's sync
        synced["t"] = time.monotonic_ns()
        return learn_pending(self)

    def stamped_wait(self, pending, add=None):
        out = wait(self, pending, add)
        if stamps and "w_exit" not in stamps[-1]:
            stamps[-1]["w_exit"] = time.monotonic_ns()
        return out

    DualExperts.submit, DualExperts.wait, SharedRates.learn_pending = stamped_submit, stamped_wait, stamped_learn_pending
    try:
        vocab = engine.tokenizer.vocab_size
        walls = []
        for p in range(prompts):
            stamps.clear()
            engine.add_request([(13 * p + 7 * i) % vocab for i in range(tokens)],
                               SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
            while engine.has_work():
                engine.step()
            for s in stamps:  # the engine's stamps of this step's jobs, before the next step runs them again
                launch, done = s["call"].engine_ns if s["call"] is not None else (0, 0)
                s["launch"], s["done"] = launch or None, done or None
            settle(layers)  # each layer's step learned from: its history holds the device share's time
            for s in stamps:
                history = s["dual"].history
                s["device_s"] = history[-1]["device_s"] if history else None
    finally:
        DualExperts.submit, DualExperts.wait, SharedRates.learn_pending = submit, wait, learn_pending
    return walls, [{k: v for k, v in s.items() if k not in ("call", "dual")} for s in stamps]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a GGUF file or model directory")
    p.add_argument("--tokens", type=int, default=512, help="prompt tokens, one step (default 512)")
    p.add_argument("--threads", type=int, default=None, help="CPU engine threads (default: the runtime's)")
    p.add_argument("--prompts", type=int, default=4, help="prompts run; the last is tabulated (default 4)")
    p.add_argument("--json", help="write the rows and means here")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.prompts < 1:
        raise SystemExit("--tokens and --prompts must be >= 1")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("prefill_layers needs a CUDA GPU")
    walls, stamps = measure(args.model, args.tokens, args.threads, args.prompts)
    t = layer_table(stamps)
    print(f"{args.model}: {args.tokens}-token steps: {', '.join(f'{w:.1f}' for w in walls)} ms; "
          f"the last one's {len(t['rows'])} MoE layers (ms):")
    print(" layer   enter    sync    exit  w_exit  launch    done  engine  device    gap  split submit ndev runs")
    for r in t["rows"]:
        print(f"{r['layer']:6d} " + " ".join(f"{r[c]:7.2f}" for c in ("enter", "sync", "exit", "w_exit", "launch", "done"))
              + " " + " ".join(f"{r[c]:7.2f}" if c in ("engine", "device") else f"{r[c]:6.2f}" for c in COLUMNS)
              + f" {r['ndev']:4d} {r['runs']:4d}")
    print("means: " + "; ".join(f"{c} {m['ms']:.2f} ms ({m['layers']} layers)" if m["ms"] is not None else f"{c} -"
                                for c, m in t["means"].items()) + f"; step {walls[-1]:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in t["rows"]]
            json.dump({"tokens": args.tokens, "walls_ms": walls, "rows": rows, "means": t["means"]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
