"""The bench's outputs: the terminal table (printed last), the JSON file and the plot.

One section per model measured (and one for a full-depth estimate, labelled so), each metric
beside its same-run bound and the % reached, and beside the peer's figure and our ratio to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tandem.errors import TandemError


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}"


def _pct(x, bound) -> str:
    return f"{100 * x / bound:.0f}%" if x and bound else "-"


def _ratio(x, peer) -> str:
    return f"{x / peer:.2f}x" if x and peer else "-"


def rows(section: dict, peer: dict | None) -> list[list[str]]:
    """[metric, tandem, bound, % of bound, peer, ratio] for one model section."""
    m, b = section["measured"], section["bounds"]
    # The dual path (CPU + streaming experts to the GPU) applies to runs on a GPU only.
    gpu = str(section["config"].get("device", "cpu")).startswith("cuda")
    dual = (b.get("prefill_dual_bound_tok_s") or {}) if gpu else {}
    cpu = b["prefill_cpu_bound_tok_s"]
    peer_prefill = (peer or {}).get("prefill_tok_s", {})
    out = []
    for p, rate in m["prefill_tok_s"].items():
        p = int(p)
        bound = dual.get(p) or dual.get(str(p)) or cpu.get(p) or cpu.get(str(p))
        kind = "dual" if dual else "cpu"
        pr = peer_prefill.get(p) or peer_prefill.get(str(p))
        out.append([f"prefill {p} tok/s", _fmt(rate), f"{_fmt(bound)} ({kind})", _pct(rate, bound), _fmt(pr), _ratio(rate, pr)])
    for p, t in m["ttft_s"].items():
        out.append([f"time to first token {int(p)} (s)", _fmt(t, 3), "", "", "", ""])
    d, rf = m["decode_tok_s"], b["decode_roofline_tok_s"]
    pd = (peer or {}).get("decode_tok_s")
    out.append([f"decode tok/s (ctx {section['config']['context']})", _fmt(d, 2), f"{_fmt(rf, 2)} (roofline)",
                _pct(d, rf), _fmt(pd, 2), _ratio(d, pd)])
    ub = b["users_bound_tok_s"]
    out.append([f"{b['users']} users tok/s (aggregate)", _fmt(m.get("users_tok_s"), 2), f"{_fmt(ub, 2)} ({b['users']}-user)",
                _pct(m.get("users_tok_s"), ub), "", ""])
    if m.get("peak_rss_gb") is not None:
        out.append(["peak RAM (GB)", _fmt(m["peak_rss_gb"], 2), "", "", "", ""])
    if m.get("peak_vram_gb") is not None:
        out.append(["peak VRAM (GB), reserved", _fmt(m["peak_vram_gb"], 2), "", "", "", ""])
    plan = m.get("plan_vram_gb")
    for key, label in (("load_peak_allocated_gb", "allocated, loading"), ("peak_allocated_gb", "allocated, running")):
        if m.get(key) is not None:
            out.append([f"peak VRAM (GB), {label}", _fmt(m[key], 2), f"{_fmt(plan, 2)} (plan)" if plan else "",
                        _pct(m[key], plan) if plan else "", "", ""])
    return out


def split_lines(splits: dict) -> list[str]:
    """The dual-path split of each prompt length's last timed prefill, per chunk (bench/dual_split.py)."""
    out = []
    for p, cs in splits.items():
        for i, c in enumerate(cs):
            share = 100 * c["device_experts"] / c["active"] if c["active"] else 0.0
            sides = []
            for side, name in (("cpu", "CPU"), ("device", "GPU")):
                pct = c.get(f"{side}_pct_of_bound")
                sides.append(f"{name} {1e3 * c[f'{side}_s']:.1f} ms at {c[f'{side}_gbs']:.1f} GB/s = {pct:.0f}% of its bound"
                             if pct is not None else f"{name} -")
            runs = (f" in {c['runs']} runs, {c['overlapped_runs']} of them copied while the run before computed"
                    if c.get("runs") else "")
            out.append(f"prefill {int(p)} split, chunk {i + 1}/{len(cs)} ({c['tokens']} tokens, {c['layers']} layers): "
                       f"GPU took {share:.0f}% of the active experts{runs}; " + "; ".join(sides))
    return out


def table(result: dict) -> str:
    mach = result["machine"]
    readings = mach.get("dram_readings") or {}
    lines = [
        f"machine: {mach['cpu']}, {mach['threads']} threads" + (f", GPU {mach['gpu']}" if mach.get("gpu") else ""),
        f"  DRAM read {mach['dram_read_gbs']:.1f} GB/s ({mach['dram_probe']}"
        + (f"; best of {', '.join(f'{k} {v:.1f}' for k, v in readings.items())})" if len(readings) > 1 else ")"),
    ]
    if mach.get("h2d_gbs"):
        lines.append(f"  pinned H2D {mach['h2d_gbs']:.1f} GB/s; both at once: CPU {mach['both_cpu_gbs']:.1f} + "
                     f"H2D {mach['both_h2d_gbs']:.1f} GB/s")
    if mach.get("amx_int8_tops"):
        lines.append(f"  AMX peak INT8 {mach['amx_int8_tops']:.1f} TOP/s, BF16 {mach['amx_bf16_tflops']:.1f} TFLOP/s")
    lines += [f"  note: {n}" for n in mach.get("notes", [])]
    if result.get("estimate"):
        lines += [f"  estimate note: {n}" for n in result["estimate"]["measured"].get("notes", [])]
    peer = result.get("peer")
    header = ["metric", "tandem", "bound", "% bound"] + ([peer["name"], "ratio"] if peer else [])
    sections = list(result["models"]) + ([result["estimate"]] if result.get("estimate") else [])
    for s in sections:
        shape = s["shape"]
        lines += ["", f"{s['title']}", (f"  routed experts: {shape['moe_layers']} MoE layers x top-{shape['top_k']} of "
                  f"{shape['experts']}, {shape['bytes_per_token'] / 1e9:.3f} GB/token ({', '.join(shape['formats'])}); "
                  f"prefill bound compute peak: {s['bounds']['compute_peak']}")]
        body = [r[: len(header)] for r in rows(s, peer if s.get("peer_applies", True) else None)]
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
        for r in [header] + body:
            lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        lines += [f"  {line}" for line in split_lines(s["measured"].get("prefill_split") or {})]
    if result.get("command"):
        lines += ["", f"reproduce: {result['command']}"]
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


def plot(result: dict, path: str | Path) -> None:
    """tok/s vs prompt length, measured beside the bounds (log-log), one colour per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TandemError("--plot needs matplotlib: pip install 'tandem[bench]'") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    sections = list(result["models"]) + ([result["estimate"]] if result.get("estimate") else [])
    for i, s in enumerate(sections):
        color = f"C{i}"
        prompts = sorted(int(p) for p in s["measured"]["prefill_tok_s"])
        label = s["title"]

        def series(d, prompts=prompts):  # None (an estimate that noise made meaningless) -> a gap
            return [v if (v := d.get(p, d.get(str(p)))) is not None else float("nan") for p in prompts]

        ax.plot(prompts, series(s["measured"]["prefill_tok_s"]), "o-", color=color, label=f"{label}: prefill")
        ax.plot(prompts, series(s["bounds"]["prefill_cpu_bound_tok_s"]), "--", color=color, label="CPU prefill bound")
        if s["bounds"].get("prefill_dual_bound_tok_s"):
            ax.plot(prompts, series(s["bounds"]["prefill_dual_bound_tok_s"]), ":", color=color, label="dual-path bound")
        if s["measured"]["decode_tok_s"]:
            ax.axhline(s["measured"]["decode_tok_s"], color=color, lw=1, alpha=0.7, label="decode (measured)")
        ax.axhline(s["bounds"]["decode_roofline_tok_s"], color=color, lw=1, ls="-.", alpha=0.7, label="decode roofline")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"tandem bench: {result['machine']['cpu']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
