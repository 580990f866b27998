"""MLA prefill attention of one layer over long contexts: one prompt chunk of --tokens new tokens at
the end of a context of N tokens, as tandem/layers/attention.py runs it (MLAttention._prefill: keys
and values expanded from the latent cache, then attention), two ways:

  one-shot  the whole context expanded at once, torch's SDPA (what prefill did before issue 10; skipped
            where its expanded keys and values would not fit the free memory)
  chunked   --kv-chunk context tokens expanded at a time, ops/triton/prefill.py's kernel per chunk
            (the reference on a CPU), partial outputs merged through their log-sum-exp

Shapes: DeepSeek-V3 (128 heads) and DeepSeek-V2-Lite (16 heads), both latent 512 + rope 64, nope 128,
v 128; random bf16 weights and cache. Per row: median time of --reps calls; TFLOP/s of the work the
path must do (attention: 2 x heads x (192 + 128) per visible query-key pair; expansion: 2 x 512 x
heads x 256 per context token and pass) and that as a % of a bf16 GEMM's rate measured first;
`peak GB`: memory allocated by the call beyond its inputs; `err`: max |chunked - one-shot| / max
|one-shot| where both ran.

    python benchmarks/mla_prefill.py --json mla_prefill.json
    python benchmarks/mla_prefill.py --models v3 --contexts 131072 --tune
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tandem.layers.attention import MLAConfig, MLAttention  # noqa: E402
from tandem.layers.rope import RopeConfig  # noqa: E402

MODELS = {"v3": 128, "v2-lite": 16}  # heads; the other MLA widths are shared
LATENT, ROPE, NOPE, V = 512, 64, 128, 128
TUNE_CONFIGS = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (32, 64, 4, 2)]

_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of fn() over reps calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_tflops(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ a, 5, device) / 1e12


def layer(heads: int, device: torch.device) -> MLAttention:
    torch.manual_seed(0)
    cfg = MLAConfig(hidden_size=1024, num_heads=heads, q_lora_rank=None, kv_lora_rank=LATENT, qk_nope_head_dim=NOPE,
                    qk_rope_head_dim=ROPE, v_head_dim=V, rope=RopeConfig(dim=ROPE, theta=10000.0))
    attn = MLAttention(cfg, 0)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return attn.to(device, torch.bfloat16)


def flops(heads: int, tokens: int, ctx: int, expanded_tokens: int) -> float:
    offset = ctx - tokens
    pairs = tokens * offset + tokens * (tokens + 1) / 2
    return 2 * heads * (NOPE + ROPE + V) * pairs + 2 * LATENT * heads * (NOPE + V) * expanded_tokens


def run(args) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    peak_rate = gemm_tflops(device, args.gemm)
    log(f"bf16 GEMM {args.gemm}^3: {peak_rate:.1f} TFLOP/s")
    rows = []
    for name in args.models:
        heads = MODELS[name]
        attn = layer(heads, device)
        for ctx in args.contexts:
            tokens = min(args.tokens, ctx)
            cache = torch.randn(ctx, LATENT + ROPE, generator=gen).to(device, torch.bfloat16)
            slots = torch.arange(ctx, device=device)
            q_nope = torch.randn(tokens, heads, NOPE, generator=gen).to(device, torch.bfloat16)
            q_pe = torch.randn(tokens, heads, ROPE, generator=gen).to(device, torch.bfloat16)
            expand_bytes = ctx * heads * (2 * NOPE + V + ROPE) * 2
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 62
            ways = {"chunked": args.kv_chunk}
            if 1.5 * expand_bytes < free and ctx <= args.one_shot_max:
                ways = {"one-shot": ctx, **ways}
            outs = {}
            for way, chunk in ways.items():
                attn.kv_chunk = chunk

                def call():
                    with torch.no_grad():
                        return attn._prefill(q_nope, q_pe, cache, slots, ctx - tokens)

                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                outs[way] = call().float()
                peak = (torch.cuda.max_memory_allocated(device) - base) / 1e9 if device.type == "cuda" else 0.0
                sec = timed(call, args.reps, device)
                passes = -(-ctx // chunk)
                tf = flops(heads, tokens, ctx, ctx) / sec / 1e12
                row = {"model": name, "context": ctx, "tokens": tokens, "path": way, "kv_chunk": chunk,
                       "passes": passes, "ms": sec * 1e3, "tflops": tf, "pct_gemm": 100 * tf / peak_rate,
                       "peak_gb": peak, "err": None}
                if way == "chunked" and "one-shot" in outs:
                    ref = outs["one-shot"]
                    row["err"] = ((outs[way] - ref).abs().max() / ref.abs().max()).item()
                rows.append(row)
                log(f"{name} ctx {ctx} {way}: {sec * 1e3:.2f} ms, {tf:.1f} TFLOP/s, peak {peak:.2f} GB")
            if args.tune and device.type == "cuda":
                rows += tune(attn, name, ctx, tokens, q_nope, q_pe, cache, slots, args, device)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gemm_tflops": peak_rate, "rows": rows}


def tune(attn, name, ctx, tokens, q_nope, q_pe, cache, slots, args, device) -> list[dict]:
    """The chunked path's kernel alone over the first chunk's expanded keys, per tile config."""
    from tandem.ops.triton import prefill

    heads = attn.cfg.num_heads
    k_nope, v, k_pe = attn._expand(cache[slots[: args.kv_chunk]], torch.bfloat16)
    out = []
    for bm, bn, warps, stages in TUNE_CONFIGS:
        config = prefill.PrefillConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            sec = timed(lambda: prefill.attention_lse(q_nope, k_nope, v, attn.scale, ctx - tokens, 0,  # noqa: B023
                                                      q_pe=q_pe, k_pe=k_pe, config=config), args.reps, device)
        except Exception as e:  # a config this GPU cannot compile (shared memory, registers)
            log(f"tune {name} {bm}x{bn} w{warps} s{stages}: {type(e).__name__}: {e}")
            continue
        n = k_nope.shape[0]
        tf = 2 * heads * (NOPE + ROPE + V) * tokens * n / sec / 1e12
        out.append({"model": name, "context": ctx, "tokens": tokens, "path": f"tune {bm}x{bn} w{warps} s{stages}",
                    "kv_chunk": n, "passes": 1, "ms": sec * 1e3, "tflops": tf, "pct_gemm": None, "peak_gb": None,
                    "err": None})
    return out


def print_table(result: dict) -> None:
    print(f"\nMLA prefill attention, one layer, on {result['device']}; bf16 GEMM {result['gemm_tflops']:.1f} TFLOP/s")
    print(f"{'model':8} {'context':>8} {'tokens':>6} {'path':24} {'chunk':>6} {'ms':>9} {'TFLOP/s':>8} "
          f"{'% GEMM':>7} {'peak GB':>8} {'err':>8}")
    for r in result["rows"]:
        pct = "" if r["pct_gemm"] is None else f"{r['pct_gemm']:.0f}%"
        peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        err = "" if r["err"] is None else f"{r['err']:.1e}"
        print(f"{r['model']:8} {r['context']:8d} {r['tokens']:6d} {r['path']:24} {r['kv_chunk']:6d} {r['ms']:9.2f} "
              f"{r['tflops']:8.1f} {pct:>7} {peak:>8} {err:>8}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS), help=f"of {','.join(MODELS)}")
    p.add_argument("--contexts", type=ints, default=[2048, 8192, 32768, 131072])
    p.add_argument("--tokens", type=int, default=512, help="new tokens of the prompt chunk (--max-step-tokens)")
    p.add_argument("--kv-chunk", type=int, default=MLAttention.kv_chunk)
    p.add_argument("--one-shot-max", type=int, default=32768, help="longest context the one-shot path is timed at")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--gemm", type=int, default=8192, help="side of the bf16 GEMM that measures the matmul rate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tune", action="store_true", help="also time the kernel's tile configs")
    p.add_argument("--max-err", type=float, default=3e-2, help="exit 1 if chunked and one-shot differ more")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.kv_chunk < 1 or args.tokens < 1:
        p.error("--kv-chunk and --tokens must be >= 1")
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)
    worst = max((r["err"] for r in result["rows"] if r["err"] is not None), default=0.0)
    return 1 if worst > args.max_err else 0


if __name__ == "__main__":
    sys.exit(main())
