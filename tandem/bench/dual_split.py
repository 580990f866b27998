"""How a dual-path prefill split its work (issue 10): per chunk of a prompt, the experts the GPU
took, and each side's time against its bound at the rates measured while both run.

Each DualExperts layer records its long steps once it has learned from them (their history);
after a prefill every layer has one record per chunk, in order, so chunk k of the prompt is the
k-th new record of every layer. Summed over the layers:

    CPU side   its experts' bytes and FLOPs; bound = sum of max(bytes / both_cpu, FLOPs / peak)
    GPU side   the bytes copied to it; bound = bytes / both_h2d
    % of bound = bound seconds / measured seconds (each side's own time; the layer waits for the later)
"""

from __future__ import annotations

import torch

from tandem.bench import bounds as bnd
from tandem.layers.dual_experts import DualExperts


def dual_layers(model: torch.nn.Module) -> list[DualExperts]:
    return [m for m in model.modules() if isinstance(m, DualExperts)]


def settle(layers: list[DualExperts]) -> None:
    """Every step run so far learned from (recorded): the stream first runs past them."""
    if layers and torch.cuda.is_available():
        torch.cuda.synchronize()  # every step's events and engine stamps are final
    for d in layers:
        d.learn()


def mark(model: torch.nn.Module) -> list[int]:
    """Each dual layer's record count once the steps run so far are recorded: what `chunks` reads from."""
    layers = dual_layers(model)
    settle(layers)
    return [d.steps_recorded for d in layers]


def chunks(model: torch.nn.Module, since: list[int]) -> list[dict]:
    """The long steps each dual layer ran since `since` (mark()), summed over the layers per chunk:
    tokens, layers, active / GPU experts, each side's bytes, FLOPs and seconds (measured in that
    many layers: a side is summed over the layers that measured it)."""
    layers = dual_layers(model)
    settle(layers)
    per_layer = []
    for d, before in zip(layers, since):
        new = d.steps_recorded - before
        per_layer.append(list(d.history)[-new:] if new > 0 else [])
    return by_chunk(per_layer)


def by_chunk(per_layer: list[list[dict]]) -> list[dict]:
    """Records per layer (each layer's k-th: chunk k) -> one sum per chunk (see chunks)."""
    if not any(per_layer):
        return []
    out = []
    for k in range(max(len(r) for r in per_layer)):
        recs = [r[k] for r in per_layer if k < len(r)]
        c = {"tokens": recs[0]["tokens"], "layers": len(recs)}
        for key in ("active", "device_experts", "cpu_bytes", "cpu_flops", "device_bytes"):
            c[key] = sum(r[key] for r in recs)
        for key in ("runs", "overlapped_runs"):  # the device share's runs; those copied while the one before computed
            c[key] = sum(r.get(key, 0) for r in recs)
        for side in ("cpu", "device"):
            timed = [r for r in recs if r[f"{side}_s"] is not None]
            c[f"{side}_s"] = sum(r[f"{side}_s"] for r in timed) if timed else None
            c[f"{side}_timed_layers"] = len(timed)
            c[f"{side}_timed_bytes"] = sum(r[f"{side}_bytes"] for r in timed)
        c["cpu_timed_flops"] = sum(r["cpu_flops"] for r in recs if r["cpu_s"] is not None)
        out.append(c)
    return out


def with_bounds(chunk: dict, cpu_gbs: float | None, h2d_gbs: float | None, peak_flops: float | None) -> dict:
    """`chunk` plus each side's achieved GB/s and % of its bound (over the layers that timed it)."""
    c = dict(chunk)
    t, b = c.get("cpu_s"), c["cpu_timed_bytes"]
    if t and cpu_gbs:
        bound = bnd.cpu_seconds(b, c["cpu_timed_flops"], cpu_gbs, peak_flops)
        c["cpu_gbs"], c["cpu_pct_of_bound"] = b / t / bnd.GB, 100 * bound / t
    t, b = c.get("device_s"), c["device_timed_bytes"]
    if t and h2d_gbs:
        c["device_gbs"], c["device_pct_of_bound"] = b / t / bnd.GB, 100 * b / (h2d_gbs * bnd.GB) / t
    return c
