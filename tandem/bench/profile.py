"""`tandem bench --profile`: where a step's time goes, layer by layer, from forward hooks.

A timing pass applied to the built model (hooks, removed afterwards), not a code path of its own:
each decoder layer's attention, and for MoE layers the router, the routed experts' submit and
wait (the experts backend's methods, wrapped on the instance), the shared experts; dense layers'
FFN; then embed + final norm + head (the model's forward minus its layers) and everything outside
the model's forward (sampling, scheduling, Python: "outside model"). On CUDA every boundary
synchronizes, so the parts add up but overlap (CPU experts beside GPU shared experts) is lost:
read it as attribution, not throughput. Host<->device copies of the routed path are inside
"experts submit" / "experts wait" (CpuExperts moves x to the host and the output back).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from tandem.layers.moe import MoE

CATEGORIES = ("attention", "router", "experts submit", "shared experts", "experts wait", "moe other",
              "dense ffn", "embed+head", "outside model")


class Profile:
    def __init__(self, sync: bool):
        self.sync = sync
        self.per_layer: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.totals: dict[str, float] = defaultdict(float)
        self.moe_layers: set[int] = set()
        self.forwards = 0
        self.first: tuple[dict, dict] | None = None  # totals and per-layer after the first forward

    def model_done(self) -> None:
        self.forwards += 1
        if self.forwards == 1:
            self.first = (dict(self.totals), {i: dict(r) for i, r in self.per_layer.items()})

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, layer: int | None, what: str, seconds: float) -> None:
        self.totals[what] += seconds
        if layer is not None:
            self.per_layer[layer][what] += seconds

    def summary(self, wall_seconds: float, steps: int, skip_first: bool = False) -> dict:
        """ms per step by category (exclusive times), and per layer; skip_first leaves out the
        first forward (the prefill of a decode run)."""
        t = dict(self.totals)
        per_layer = {i: dict(r) for i, r in self.per_layer.items()}
        if skip_first and self.first is not None:
            t = {k: v - self.first[0].get(k, 0.0) for k, v in t.items()}
            for i, row in per_layer.items():
                for k in row:
                    row[k] -= self.first[1].get(i, {}).get(k, 0.0)
        moe_parts = ("router", "experts submit", "shared experts", "experts wait")
        out = {c: 0.0 for c in CATEGORIES}
        out["attention"] = t.get("attention", 0.0)
        out["dense ffn"] = t.get("dense ffn", 0.0)
        for p in moe_parts:
            out[p] = t.get(p, 0.0)
        out["moe other"] = max(0.0, t.get("moe", 0.0) - sum(out[p] for p in moe_parts))
        out["embed+head"] = max(0.0, t.get("model", 0.0) - t.get("layers", 0.0))
        out["outside model"] = max(0.0, wall_seconds - t.get("model", 0.0))
        layers = []
        for i in sorted(per_layer):
            row = per_layer[i]
            layers.append({"layer": i, "kind": "moe" if i in self.moe_layers else "dense",
                           **{k: 1e3 * v / steps for k, v in row.items()}})
        return {"steps": steps, "wall_ms_per_step": 1e3 * wall_seconds / steps,
                "ms_per_step": {k: 1e3 * v / steps for k, v in out.items()}, "layers": layers}


def _timed_method(prof: Profile, layer: int, what: str, fn):
    def wrapper(*args, **kwargs):
        t0 = prof.now()
        out = fn(*args, **kwargs)
        prof.add(layer, what, prof.now() - t0)
        return out

    return wrapper


@contextmanager
def profiled(model: torch.nn.Module, sync: bool):
    """Install the timing hooks on `model` for the duration of the block; yields the Profile."""
    prof = Profile(sync)
    handles, wrapped = [], []
    starts: dict[int, float] = {}

    def hook(module, layer, what):
        key = id(module)

        def pre(*_):
            starts[key] = prof.now()

        def post(*_):
            prof.add(layer, what, prof.now() - starts.pop(key))
            if module is model:
                prof.model_done()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    hook(model, None, "model")
    for i, layer in enumerate(model.layers):
        hook(layer, None, "layers")
        hook(layer.attn, i, "attention")
        if isinstance(layer.ffn, MoE):
            prof.moe_layers.add(i)
            hook(layer.ffn, i, "moe")
            hook(layer.ffn.router, i, "router")
            if layer.ffn.shared is not None:
                hook(layer.ffn.shared, i, "shared experts")
            experts = layer.ffn.experts
            for method, what in (("submit", "experts submit"), ("wait", "experts wait")):
                experts.__dict__[method] = _timed_method(prof, i, what, getattr(experts, method))
                wrapped.append((experts, method))
        else:
            hook(layer.ffn, i, "dense ffn")
    try:
        yield prof
    finally:
        for h in handles:
            h.remove()
        for obj, method in wrapped:
            del obj.__dict__[method]


def layer_split(calls: list) -> dict[str, list[int]]:
    """One step's MoE layers, in order, split by each layer's CpuExperts stream call (cpu.HostCall)
    stamps, in ns per layer: "submit -> wait" (the call taken .. the wait entered), "wait" (entered
    .. left), "submit -> launch" (staging), "engine job" (launch .. last worker done), "done ->
    answered" (the job's end .. the wait left) and "gpu between" (one layer's wait left .. the next
    layer's submit: the GPU's part of a layer; one fewer than the layers)."""
    out: dict[str, list[int]] = {k: [] for k in ("submit -> wait", "wait", "submit -> launch", "engine job",
                                                 "done -> answered", "gpu between")}
    prev_end = None
    for call in calls:
        submit, wait_begin, wait_end = call.times_ns
        launch, done = call.engine_ns
        out["submit -> wait"].append(wait_begin - submit)
        out["wait"].append(wait_end - wait_begin)
        out["submit -> launch"].append(launch - submit)
        out["engine job"].append(done - launch)
        out["done -> answered"].append(wait_end - max(done, wait_begin))
        if prev_end is not None:
            out["gpu between"].append(submit - prev_end)
        prev_end = wait_end
    return out


def stream_split(llm, prompt: list[int], n: int) -> dict | None:
    """Where decode time goes with the CPU experts on the CUDA stream (graphs as configured; no
    look-ahead: each step's calls are read when it ended), from
    the host functions' own timestamps, so nothing is synchronized inside a step. Per step and
    MoE layer: submit -> wait entered is CPU expert work overlapped by GPU work (shared experts,
    copies), wait entered -> left is the GPU stream stalled on the CPU; the rest of the step is GPU
    work while the CPU engine idles (attention, dense layers, head) and host overhead. The engine's
    own stamps (HostCall.engine_ns) split the CPU side further: its jobs (launch -> last worker
    done), the wait's wake-up after a job ended, and the time between one layer's wait and the
    next layer's submit (the GPU's part of a layer); per-layer medians and p90 of the job time
    show stalls (a job waits for every worker). Through a doorbell (ops.cpu.Doorbell) the host
    never sees the stream reach its wait: "wait entered" is when the doorbell's thread saw the job
    end, so the stall reads ~0 and the overlap holds the whole job; "between" still spans the GPU's
    part of a layer. None without CpuExperts on a CUDA model."""
    from tandem.layers.cpu_experts import CpuExperts
    from tandem.runtime.sampling import SamplingParams

    found = (next((e for e in m.ffn.experts.modules() if isinstance(e, CpuExperts)), None)  # or in a wrapper
             for m in llm.model.layers if isinstance(m.ffn, MoE))
    experts = [e for e in found if e is not None]  # one per layer: its own engine calls
    if not experts or llm.engine.runner.device.type != "cuda":
        return None
    params = SamplingParams(temperature=0.0, max_new_tokens=n + 1, ignore_eos=True)
    names = {"submit -> wait": "cpu experts overlapped by gpu", "wait": "gpu stalled on cpu experts",
             "engine job": "engine jobs", "done -> answered": "wake-up after a job",
             "gpu between": "gpu between expert calls"}
    sums = dict.fromkeys(names.values(), 0.0)
    wall, steps, last, job_us = 0.0, 0, None, []
    with steps_alone(llm):  # else the latest call would be the next step's
        for out in llm.engine.stream(prompt, params):
            torch.cuda.synchronize()
            now = time.perf_counter()
            if not out.is_prefill and last is not None:
                # a layer whose experts are all hot never calls the engine: it has no call to read
                split = layer_split([c for e in experts if (c := e.latest_call()) is not None])
                for key, name in names.items():
                    sums[name] += sum(split[key]) / 1e9
                job_us += [t / 1e3 for t in split["engine job"]]
                wall += now - last
                steps += 1
            last = now
    if not steps:
        return None
    overlap, stall = sums["cpu experts overlapped by gpu"], sums["gpu stalled on cpu experts"]
    ms = {"cpu experts overlapped by gpu": overlap, "gpu stalled on cpu experts": stall,
          "gpu only + host": max(0.0, wall - overlap - stall), "engine jobs": sums["engine jobs"],
          "wake-up after a job": sums["wake-up after a job"], "gpu between expert calls": sums["gpu between expert calls"]}
    job_us.sort()
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
            "ms_per_step": {k: 1e3 * v / steps for k, v in ms.items()},
            "engine_job_us": {"median": job_us[len(job_us) // 2], "p90": job_us[int(0.9 * (len(job_us) - 1))]},
            "graphs": llm.engine.runner.cuda_graphs, "doorbell": experts[0].engine.doorbell is not None}


@contextmanager
def steps_alone(llm):
    """Within: the engine runs each step by itself (no look-ahead), so what a step's end shows is its own."""
    ahead, llm.engine.look_ahead = llm.engine.look_ahead, False
    try:
        yield
    finally:
        llm.engine.look_ahead = ahead


def profile_run(llm, cfg, timer, log=print) -> dict:
    """One profiled prefill (the first prompt length) and one profiled decode (eager, every
    boundary synchronized: attribution), then the overlapped split of a decode on the CUDA stream."""
    sync = torch.device(cfg.device).type == "cuda"
    graphs, llm.engine.runner.cuda_graphs = llm.engine.runner.cuda_graphs, False  # hooks must not be captured
    out = {}
    p = cfg.prompts[0]
    with profiled(llm.model, sync) as prof:
        t0 = time.perf_counter()
        timer.prefill(p)
        out[f"prefill_{p}"] = prof.summary(time.perf_counter() - t0, 1)
    n = cfg.decode_tokens
    prompt = timer.prompt(cfg.context)
    llm.generate(prompt[:16], max_new_tokens=2, temperature=0.0, ignore_eos=True)  # warm
    with profiled(llm.model, sync) as prof, steps_alone(llm):  # no step's work inside the step before
        g = llm.generate(prompt, max_new_tokens=n + 1, temperature=0.0, ignore_eos=True)
    out[f"decode_after_{cfg.context}"] = prof.summary(g.decode_seconds, n, skip_first=True)
    llm.engine.runner.cuda_graphs = graphs
    split = stream_split(llm, prompt, n)
    if split is not None:
        out[f"decode_split_after_{cfg.context}"] = split
    for name, summary in out.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in summary["ms_per_step"].items() if v > 0.005)
        jobs = summary.get("engine_job_us")
        if jobs:
            parts += f"; engine job per layer {jobs['median']:.0f} us (p90 {jobs['p90']:.0f})"
        log(f"profile {name} (ms per step): {parts}")
    return out
