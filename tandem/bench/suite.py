"""One benchmark run: measure the machine, then each model, then (optionally) extrapolate and the peer.

    machine = measure_machine()                          # bandwidths, AMX: this run's limits
    for each model: shape from the GGUF header -> bounds -> load -> warm up -> timed medians
    --extrapolate A B: two truncations -> full-depth estimate with full-depth bounds
    --peer llama.cpp: the same prompts and threads through llama-bench

Returns one dict (what --json writes); report.table() renders it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, replace

import torch

from tandem.bench import bounds as bnd
from tandem.bench import dual_split
from tandem.bench.extrapolate import check_pair, estimate
from tandem.bench.machine import measure_machine, reprobe
from tandem.bench.measure import BenchConfig, Timer, free_memory, load, run
from tandem.bench.peer import measure_peer
from tandem.bench.profile import profile_run
from tandem.errors import TandemError
from tandem.runtime.loader import open_model_files

SYNTH = "tandem.synth."


def model_facts(path: str) -> dict:
    """From headers only: the expert shape, dense lead layers, and what the file says of its full model."""
    with open_model_files(path) as files:
        cfg = files.config()
        dense = sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        if files.gguf is None:
            return {"shape": None, "dense": dense, "meta": {}, "config": cfg}
        shape = bnd.expert_shape_from_gguf(files.gguf, cfg.num_experts_per_tok)
        meta = {k[len(SYNTH):]: v for k, v in files.gguf.metadata.items() if k.startswith(SYNTH)}
        return {"shape": shape, "dense": dense, "meta": meta, "config": cfg}


def _shape_from_engine(llm) -> bnd.ExpertShape:
    """Float checkpoints: the bytes the CPU engine holds (bf16 / int8 / int4 repacks)."""
    layers, fmts = [], set()
    for module in llm.model.modules():
        experts = getattr(module, "experts", None)
        if experts is not None and hasattr(experts, "nbytes") and hasattr(experts, "formats"):
            layers.append(experts.nbytes)
            fmts.update(experts.formats)
    cfg = llm.model.cfg
    if not layers:
        raise TandemError("no routed experts in the CPU engine: tandem bench measures MoE models")
    moe = cfg.moe()
    return bnd.ExpertShape(len(layers), moe.num_experts, moe.top_k, moe.hidden_size, moe.intermediate_size,
                           sum(layers) / len(layers) / moe.num_experts, tuple(sorted(fmts)))


def bench_model(cfg: BenchConfig, machine, *, profile: bool, progress: bool, log) -> dict:
    facts = model_facts(cfg.model)
    log(f"loading {cfg.model}")
    cuda = torch.cuda.is_available() and torch.device(cfg.device).type == "cuda"
    if cuda:  # the peaks below are the model's: not the machine probes' buffers, not an earlier model's
        torch.cuda.reset_peak_memory_stats()
    llm, seconds = load(cfg, progress)
    load_peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the run's own peak, apart from the loader's transients
    try:
        shape = facts["shape"] or _shape_from_engine(llm)
        section = {
            "title": f"{os.path.basename(cfg.model)} (measured)",
            "model": cfg.model,
            "config": asdict(cfg),
            "dense_layers": facts["dense"],
            "synth": facts["meta"],
            "shape": shape.as_dict(),
            "bounds": bnd.all_bounds(shape, machine, list(cfg.prompts), cfg.users or 16),
        }
        measured = run(llm, cfg, log)
        peak, _ = bnd.compute_peak(shape, machine.amx_int8_tops, machine.amx_bf16_tflops)
        measured.prefill_split = {p: [dual_split.with_bounds(c, machine.both_cpu_gbs, machine.both_h2d_gbs, peak)
                                      for c in cs] for p, cs in measured.prefill_split.items()}
        measured.load_seconds = seconds
        measured.load_peak_allocated_gb = load_peak
        section["measured"] = asdict(measured)
        if profile:
            section["profile"] = profile_run(llm, cfg, Timer(llm, replace(cfg, seed=cfg.seed + 1)), log)
    finally:
        del llm
        free_memory()
    return section


def full_shape(a: dict, moe_full: int | None) -> tuple[bnd.ExpertShape, int]:
    """The full model's expert shape: exact for synthetic files (they record it), else per-layer bytes
    of the truncation times the full MoE depth (--full-layers)."""
    shape = _shape_of(a)
    meta = a["synth"]
    if moe_full is None and meta.get("full_moe_block_count"):
        moe_full = int(meta["full_moe_block_count"])
        per_expert = int(meta["full_routed_expert_bytes"]) / (moe_full * shape.experts)
        return bnd.ExpertShape(moe_full, shape.experts, shape.top_k, shape.hidden, shape.inter, per_expert,
                               shape.formats), moe_full
    if moe_full is None:
        raise TandemError("these files do not say how deep the full model is: give --full-layers N")
    return shape.with_moe_layers(moe_full), moe_full


def bench(cfg: BenchConfig, *, extrapolate: tuple[str, str] | None = None, profile: bool = False,
          peer: str | None = None, llama_bench: str | None = None, full_layers: int | None = None,
          bw_bytes: int = 4 << 30, progress: bool = True, command: str = "", log=print) -> dict:
    threads = cfg.threads or len(os.sched_getaffinity(0))
    if extrapolate:  # a mismatched pair fails before minutes of measuring
        facts = sorted((model_facts(p) for p in extrapolate), key=lambda f: -(f["shape"].moe_layers if f["shape"] else 0))
        if any(f["shape"] is None for f in facts):
            raise TandemError("--extrapolate takes two GGUF truncations of one model")
        check_pair(facts[0]["shape"], facts[1]["shape"], facts[0]["dense"], facts[1]["dense"])
        if facts[0]["shape"].moe_layers == facts[1]["shape"].moe_layers:
            raise TandemError("the two truncations have the same number of MoE layers: give two different depths")
        deeper = facts[0]["dense"] + facts[0]["shape"].moe_layers
        if full_layers is not None and full_layers <= deeper:
            raise TandemError(f"--full-layers {full_layers} is not deeper than the deeper truncation ({deeper} "
                              "layers): it is the full model's depth the two are extrapolated to")
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise TandemError("--device cuda, but torch sees no CUDA GPU")
    machine = measure_machine(threads, bw_bytes, cuda=torch.cuda.is_available(), log=log)
    result = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.as_dict(),
        "models": [],
    }
    paths = list(extrapolate) if extrapolate else [cfg.model]
    for path in paths:
        result["models"].append(bench_model(replace(cfg, model=path), machine, profile=profile, progress=progress, log=log))
    rose = reprobe(machine, bw_bytes, "after the engines", log)
    result["machine"] = machine.as_dict()
    if rose:  # the bounds follow the best reading of the run
        for section in result["models"]:
            section["bounds"] = bnd.all_bounds(_shape_of(section), machine, list(cfg.prompts), cfg.users or 16)
    if extrapolate:
        result["estimate"] = _estimate(result["models"], machine, cfg, full_layers)
    if peer:
        target = paths[0]
        p = measure_peer(peer, target, cfg, threads, cuda, llama_bench, log)
        if p is not None:
            result["peer"] = p
            for s in result["models"]:
                s["peer_applies"] = s["model"] == target
            if result.get("estimate"):
                result["estimate"]["peer_applies"] = False
    return result


def _shape_of(section: dict) -> bnd.ExpertShape:
    return bnd.ExpertShape(**{k: v for k, v in section["shape"].items() if k != "bytes_per_token"})


def _estimate(models: list[dict], machine, cfg: BenchConfig, full_layers: int | None) -> dict:
    a, b = sorted(models, key=lambda s: -s["shape"]["moe_layers"])
    sa, sb = _shape_of(a), _shape_of(b)
    check_pair(sa, sb, a["dense_layers"], b["dense_layers"])
    moe_full = full_layers - a["dense_layers"] if full_layers else None
    shape, moe_full = full_shape(a, moe_full)
    est = estimate(a["measured"], b["measured"], sa.moe_layers, sb.moe_layers, moe_full)
    arch = a["synth"].get("arch", os.path.basename(a["model"]))
    return {
        "title": f"{arch}, full depth: ESTIMATE from {sa.moe_layers} vs {sb.moe_layers} MoE layers "
                 f"extrapolated to {moe_full}",
        "estimate": True,
        "config": asdict(cfg),
        "shape": shape.as_dict(),
        "bounds": bnd.all_bounds(shape, machine, list(cfg.prompts), cfg.users or 16),
        "measured": est,
    }
