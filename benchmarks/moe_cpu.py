"""One routed-expert MoE layer on tandem's CPU engine, against the machine's own limits.

Measures the machine first (DRAM read bandwidth: pinned threads streaming an --bw-gb buffer; AMX
peak: tile dot products on registers), then times one MoE layer per (shape, format, tokens,
threads). Every timed call routes fresh random ids into one of >= --copies copies of the layer
(>= --min-gb in all, capped by --max-gb), so caches cannot serve the weights. A call runs the way
the runtime runs it next to a GPU: through a HostCall (submit and wait in C++ on fixed buffers, no
Python between them, as the stream's doorbell thread runs it: the calling thread works on the job
as one more worker (so --threads N streams with N + 1 threads, `workers` in the rows and N+1 in the
table; TANDEM_JOIN=0: it only waits), then spins, never asleep on a condition variable, whose
wake-up cost the T = 1 rows ~25 us a call that decode never pays); its inputs are copied into those
buffers untimed, as the stream's copies are. Weights are random bytes written straight into each
format's row layout (GGUF blocks, INT8/INT4/BF16 rows) with sane scales; values do not matter for
speed.

Per row: median time of --repeats calls (after --warmup), GB/s of distinct expert bytes read, % of
the measured bandwidth (the best reading over the --threads counts: the machine's figure), TFLOP/s
(2 * T * k * 3 * H * I per call), and % of the row's bound:
max(bytes / bandwidth, FLOP / tile peak) -- the tile peak (best over --threads) is AMX-INT8 for
kernels on int8 tiles (INT8; INT4, unpacked to bytes per 64-row block) and AMX-BF16 for bf16
tiles (BF16; the GGUF formats expand weights to bf16 for prefill; see the `path` column;
TANDEM_AMX_INT4=bf16 puts INT4 back on bf16 tiles, TANDEM_AMX_PREFETCH=0 stops the tile kernels
prefetching the next row block's weights); without AMX the bound is bandwidth only. The final table keeps the best
thread count of each row. kt-kernel (if importable) runs the same rows where it has the format,
in a process of its own: a crash there (a heap error surfaced right after its BF16 row on the
H200 box) costs its rows, never tandem's.
--prefill-rows 0,64,256 times the prefill rows once per task size of the engine's prefill kernels
(0: its automatic choice); the table keeps the best and names it in `path`.

Example (the production Xeon, 16 cores):
    python benchmarks/moe_cpu.py --threads 14,15,16 --json moe_cpu.json
Small, on a laptop:
    python benchmarks/moe_cpu.py --shapes qwen3 --tokens 1,32 --copies 1 --max-gb 0.5 --experts 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.moe_layers import SHAPES, Shape, layer_bytes, layer_sources  # noqa: E402
from tandem.ops import cpu  # noqa: E402


FORMATS = ("q4_k_m", "int4", "int8", "bf16")
KT_CLASSES = {"int8": "AMXInt8_MOE", "int4": "AMXInt4_MOE", "bf16": "AMXBF16_MOE"}


_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def routings(n: int, T: int, experts: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.rand(T, experts, generator=g).topk(k, dim=-1).indices.to(torch.int32)
        w = torch.rand(T, k, generator=g)
        out.append((ids, w))
    return out


def joined() -> bool:
    """Whether the calling thread works on the engine's jobs (TANDEM_JOIN, on unless 0)."""
    return os.environ.get("TANDEM_JOIN") != "0"


def machine(threads: list[int], bw_gb: float) -> dict:
    """The probes at each thread count, and at one more where the calling thread joins the engine's
    jobs (N + 1 threads stream; TANDEM_JOIN=0: it does not), up to the cpus this process may use."""
    info = {"bandwidth_gbs": {}, "amx_int8_tops": {}, "amx_bf16_tflops": {}}
    cores = len(os.sched_getaffinity(0))
    for t in sorted(set(threads) | ({n + 1 for n in threads if n < cores} if joined() else set())):
        info["bandwidth_gbs"][t] = cpu.stream_read_bandwidth(int(bw_gb * 1e9), t, rounds=5)
        log(f"DRAM read bandwidth, {t} threads: {info['bandwidth_gbs'][t]:.1f} GB/s")
        for dtype, key in (("int8", "amx_int8_tops"), ("bf16", "amx_bf16_tflops")):
            peak = cpu.amx_peak(dtype, t)
            info[key][t] = peak
            if peak is not None:
                log(f"AMX {dtype} peak, {t} threads: {peak:.1f} T{'OP' if dtype == 'int8' else 'FLOP'}/s")
    return info


def copies_for(layer_gb: float, args) -> int:
    want = max(args.copies, math.ceil(args.min_gb / layer_gb))
    cap = max(1, math.floor(args.max_gb / layer_gb))
    return max(1, min(want, cap))


def time_calls(run, calls, warmup: int, after=None, before=None) -> list[float]:
    """Seconds of each call after the warm-up ones; before(*call) and after() run untimed around
    each call."""
    times = []
    for i, c in enumerate(calls):
        if before is not None:
            before(*c)
        t0 = time.perf_counter()
        run(*c)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            if after is not None:
                after()
    return times


def machine_best(mach: dict, key: str) -> float | None:
    """The machine's figure: the best reading over the thread counts measured (a property of the
    machine, not of one thread count; the highest is the conservative bound)."""
    vals = [v for v in mach[key].values() if v is not None]
    return max(vals) if vals else None


def tile_peak(path: str, mach: dict) -> tuple[float | None, str]:
    if path.startswith("amx-int8"):
        return machine_best(mach, "amx_int8_tops"), "amx-int8"
    if path.startswith("amx-bf16"):
        return machine_best(mach, "amx_bf16_tflops"), "amx-bf16"
    return None, "bandwidth"


def bench_engine(shape: Shape, fmt: str, args, mach: dict, threads: int, rows: list) -> None:
    types, src = layer_sources(fmt, shape, args.experts or shape.experts)
    E = args.experts or shape.experts
    lb = layer_bytes(types, shape, E)
    n_copies = copies_for(lb / 1e9, args)
    log(f"{shape.name} {fmt} {types}: {n_copies} copies x {lb / 1e9:.2f} GB, {threads} threads")
    eng = cpu.create_engine(n_threads=threads, isa=args.isa)
    layers = []
    for c in range(n_copies):
        layers.append(cpu.add_layer(eng, types, *src, prequantized=True))
        print(f"\r  packing copy {c + 1}/{n_copies}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    del src
    kinfo = eng.kernel_info()
    k = shape.top_k
    for T in args.tokens:
        counts_big = T * k / E >= kinfo[types[0]].get("big_min", 1 << 30)
        # the task size only matters to the prefill kernels
        for prefill_rows in args.prefill_rows if counts_big else args.prefill_rows[:1]:
            eng.prefill_rows = prefill_rows
            bench_tokens(eng, layers, shape, fmt, types, T, counts_big, args, mach, threads, rows)


def bench_tokens(eng, layers, shape, fmt, types, T, counts_big, args, mach, threads, rows) -> None:
    """One row: T tokens per call over the layer copies, timed through host calls."""
    E = args.experts or shape.experts
    H, I, k = shape.hidden, shape.inter, shape.top_k
    n_copies = len(layers)
    per_expert = eng.layer_info(layers[0])["bytes"] / E
    kinfo = eng.kernel_info()
    calls_n = args.warmup + args.repeats
    route = routings(calls_n, T, E, k, seed=T)
    x = torch.randn(T, H, dtype=torch.bfloat16)
    out = torch.empty(T, H, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(T + 1)
    picks = torch.randint(0, n_copies, (calls_n,), generator=g).tolist()
    calls = [(p, ids, w) for p, (ids, w) in zip(picks, route)]
    bids, bw_ = torch.empty(T, k, dtype=torch.int32), torch.empty(T, k)
    host = [cpu.host_call(eng, layer, x, bids, bw_, out) for layer in layers]

    def load(p, ids, w, bids=bids, bw_=bw_):
        bids.copy_(ids)
        bw_.copy_(w)

    def run(p, ids, w, host=host):
        host[p].run()

    phases: list[dict] = []
    waits: list[dict] = []  # per call and phase: the first worker's wait for the last (its imbalance)

    def after(phases=phases, waits=waits):
        phases.append(eng.last_phases())
        waits.append({p: last - first for p, (first, last) in eng.last_phase_spread().items()})

    times = time_calls(run, calls, args.warmup, after=after, before=load)
    distinct = [len(torch.unique(ids)) for _, ids, _ in calls[args.warmup :]]
    gbs = statistics.median(d * per_expert / t / 1e9 for d, t in zip(distinct, times))
    t_med = statistics.median(times)
    flop = 2.0 * T * k * 3 * H * I
    path = kinfo[types[0]]["big_path"] if counts_big else kinfo[types[0]]["path"]
    peak, peak_kind = tile_peak(path, mach)
    bw = machine_best(mach, "bandwidth_gbs")
    bytes_med = statistics.median(distinct) * per_expert
    t_bound = bytes_med / (bw * 1e9)
    bound_kind = "bandwidth"
    if peak:
        t_comp = flop / (peak * 1e12)
        if t_comp > t_bound:
            t_bound, bound_kind = t_comp, peak_kind
    row = {
        "engine": "tandem",
        "shape": shape.name,
        "format": fmt,
        "types": "/".join(types),
        "tokens": T,
        "threads": threads,
        "workers": threads + joined(),  # the engine's threads and the calling thread, if it joins
        "copies": n_copies,
        "path": path + (f" rows={eng.prefill_rows or 'auto'}" if counts_big else ""),
        "prefill_rows": eng.prefill_rows,
        "ms": t_med * 1e3,
        "gbs": gbs,
        "pct_bw": 100 * gbs / bw,
        "tflops": flop / t_med / 1e12,
        "bound": bound_kind,
        "pct_bound": 100 * t_bound / t_med,
        # when (ms after launch) the engine's phases ended, medians over the timed calls
        "phases": {p: statistics.median(ph[p] for ph in phases) for p in phases[0]},
        "phase_waits": {p: statistics.median(wt[p] for wt in waits) for p in waits[0]},
    }
    rows.append(row)
    log(
        f"  T={T:5d}  {row['ms']:9.3f} ms  {gbs:6.1f} GB/s ({row['pct_bw']:5.1f}% bw)  "
        f"{row['tflops']:6.2f} TFLOP/s  {row['pct_bound']:5.1f}% of {bound_kind} bound  [{row['path']}, {row['workers']} workers]  "
        + " ".join(f"{p}<{v:.2f}" for p, v in row["phases"].items())
        + "  waits " + " ".join(f"{p} {v:.2f}" for p, v in row["phase_waits"].items())
    )


KT_CHILD_TIMEOUT = 1800  # seconds one kt-kernel process may take for its rows
KT_ROW = "KT-ROW "  # prefix of a row on the child's stdout


def bench_kt_isolated(shape_key: str, fmt: str, argv: list[str], threads: int, rows: list) -> None:
    """bench_kt in a child process (this script with --kt-child): its rows come back as JSON lines
    on stdout as they are measured; if the process dies, the rows it finished are kept and a
    skipped row says how it ended."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--kt-child", f"{shape_key},{fmt},{threads}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=KT_CHILD_TIMEOUT)
        out, err = done.stdout, done.stderr
        ended = f"exit code {done.returncode}" if done.returncode else ""
    except subprocess.TimeoutExpired as exc:
        out, err = exc.stdout or b"", ""  # captured output of a timeout comes as bytes
        out = out.decode() if isinstance(out, bytes) else out
        ended = f"a timeout after {KT_CHILD_TIMEOUT} s"
    got = [json.loads(line[len(KT_ROW):]) for line in out.splitlines() if line.startswith(KT_ROW)]
    rows += got
    for line in err.splitlines():
        if "kt-kernel" in line:
            print(line, file=sys.stderr, flush=True)  # the child's own log line, timestamp and all
    if ended:
        why = f"kt-kernel's process ended with {ended} after {len(got)} rows"
        rows.append({"engine": "kt-kernel", "shape": SHAPES[shape_key].name, "format": fmt, "threads": threads,
                     "skipped": why})
        log(f"  kt-kernel {SHAPES[shape_key].name} {fmt}: {why}")


def kt_argv(argv: list[str]) -> list[str]:
    """This run's arguments for a kt-kernel child: the same ones, less where the parent writes."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def bench_kt(shape: Shape, fmt: str, args, threads: int, rows: list) -> None:
    """kt-kernel on the same rows. API facts from its public benchmarks (bench/bench_moe_amx.py):
    kt_kernel_ext.CPUInfer(threads); moe.MOEConfig(E, k, H, I, 0) with gate/up/down bf16 data
    pointers, max_len and pool; AMX*_MOE(config); load_weights_task(...); forward_task(bsz ptr, k,
    int64 ids ptr, fp32 weights ptr, bf16 in ptr, bf16 out ptr, False). Versions differ in details;
    any failure becomes a skipped row that says why."""
    E = args.experts or shape.experts
    H, I, k = shape.hidden, shape.inter, shape.top_k

    def skip(why: str) -> None:
        rows.append({"engine": "kt-kernel", "shape": shape.name, "format": fmt, "threads": threads, "skipped": why})
        log(f"  kt-kernel {shape.name} {fmt}: skipped ({why})")

    if fmt not in KT_CLASSES:
        return skip("kt-kernel has no such format")
    try:
        from kt_kernel import kt_kernel_ext
    except Exception as exc:  # noqa: BLE001 -- any import failure means: not available here
        return skip(f"kt_kernel not importable: {exc}")
    try:
        infer = kt_kernel_ext.CPUInfer(threads)
        weights = [torch.randn(E, I, H, dtype=torch.bfloat16) / H**0.5 for _ in range(2)]
        weights.append(torch.randn(E, H, I, dtype=torch.bfloat16) / I**0.5)
        config = kt_kernel_ext.moe.MOEConfig(E, k, H, I, 0)
        config.max_len = max(args.tokens)
        config.gate_proj, config.up_proj, config.down_proj = (w.data_ptr() for w in weights)
        config.pool = infer.backend_
        moe = getattr(kt_kernel_ext.moe, KT_CLASSES[fmt])(config)
        mapping = torch.arange(E, dtype=torch.int64)
        try:
            infer.submit(moe.load_weights_task(mapping.data_ptr()))
        except TypeError:
            infer.submit(moe.load_weights_task())
        infer.sync()
    except Exception as exc:  # noqa: BLE001
        return skip(f"kt-kernel setup failed ({type(exc).__name__}: {exc}); TODO: match this version's API")
    for T in args.tokens:
        route = routings(args.warmup + args.repeats, T, E, k, seed=T)
        x = torch.randn(T, H, dtype=torch.bfloat16)
        out = torch.empty(T, H, dtype=torch.bfloat16)
        bsz = torch.tensor([T], dtype=torch.int32)

        def run(ids, w, x=x, out=out, bsz=bsz):
            ids64 = ids.to(torch.int64).contiguous()
            task = moe.forward_task(
                bsz.data_ptr(), k, ids64.data_ptr(), w.data_ptr(), x.data_ptr(), out.data_ptr(), False
            )
            infer.submit(task)
            infer.sync()

        try:
            times = time_calls(run, route, args.warmup)
        except Exception as exc:  # noqa: BLE001
            return skip(f"forward failed ({type(exc).__name__}: {exc})")
        t_med = statistics.median(times)
        rows.append(
            {
                "engine": "kt-kernel",
                "shape": shape.name,
                "format": fmt,
                "tokens": T,
                "threads": threads,
                "ms": t_med * 1e3,
                "tflops": 2.0 * T * k * 3 * H * I / t_med / 1e12,
                "copies": 1,
            }
        )
        log(f"  kt-kernel T={T:5d}  {t_med * 1e3:9.3f} ms (one copy: caches may serve small shapes)")


def best_rows(rows: list) -> list:
    """The best thread count of each (shape, format, tokens), with kt-kernel's best beside it."""
    best: dict = {}
    kt: dict = {}
    for r in rows:
        if "ms" not in r:
            continue
        key = (r["shape"], r["format"], r["tokens"])
        table = best if r["engine"] == "tandem" else kt
        if key not in table or r["ms"] < table[key]["ms"]:
            table[key] = r
    out = []
    for key, r in best.items():
        r = dict(r)
        if key in kt:
            r["kt_ms"] = kt[key]["ms"]
            r["vs_kt"] = kt[key]["ms"] / r["ms"]
        out.append(r)
    return out


def workers_label(row: dict) -> str:
    """"14+1" where the calling thread joined the engine's 14 threads, else "14"."""
    extra = row["workers"] - row["threads"]
    return f"{row['threads']}+{extra}" if extra else str(row["threads"])


def print_table(rows: list, mach: dict) -> None:
    print()
    bw = ", ".join(f"{t} thr {v:.1f}" for t, v in mach["bandwidth_gbs"].items())
    print(f"DRAM read bandwidth (GB/s): {bw}; rows use the best, {machine_best(mach, 'bandwidth_gbs'):.1f}")
    for key, unit in (("amx_int8_tops", "TOP/s"), ("amx_bf16_tflops", "TFLOP/s")):
        vals = {t: v for t, v in mach[key].items() if v is not None}
        if vals:
            print(
                f"{key.split('_')[1].upper()} AMX peak ({unit}): "
                + ", ".join(f"{t} thr {v:.1f}" for t, v in vals.items())
                + f"; bounds use the best, {max(vals.values()):.1f}"
            )
    head = f"{'shape':18} {'format':7} {'T':>5} {'thr':>5} {'ms':>9} {'GB/s':>7} {'%bw':>6} {'TFLOP/s':>8} {'%bound':>7} {'bound':10} {'kt ms':>9} {'vs kt':>6}  path"
    print(head)
    print("-" * len(head))
    for r in best_rows(rows):
        kt_ms = f"{r['kt_ms']:9.3f}" if "kt_ms" in r else f"{'-':>9}"
        vs = f"{r['vs_kt']:5.2f}x" if "vs_kt" in r else f"{'-':>6}"
        print(
            f"{r['shape']:18} {r['format']:7} {r['tokens']:5d} {workers_label(r):>5} {r['ms']:9.3f} {r['gbs']:7.1f} "
            f"{r['pct_bw']:5.1f}% {r['tflops']:8.2f} {r['pct_bound']:6.1f}% {r['bound']:10} {kt_ms} {vs}  {r['path']}"
        )
    for r in rows:
        if "skipped" in r:
            print(f"kt-kernel {r['shape']} {r['format']} ({r['threads']} thr): skipped -- {r['skipped']}")


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default="v3,v2-lite,qwen3", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--tokens", type=int_list, default=[1, 4, 32, 256, 2048], help="tokens per call, comma list")
    p.add_argument(
        "--threads", type=int_list, default=None, help="thread counts, comma list (default: all usable cpus)"
    )
    p.add_argument("--copies", type=int, default=8, help="at least this many copies of the layer")
    p.add_argument("--min-gb", type=float, default=4.0, help="and at least this many GB of copies")
    p.add_argument("--max-gb", type=float, default=48.0, help="but at most this many GB of copies (>= 1 copy)")
    p.add_argument("--experts", type=int, default=None, help="override the shape's expert count (small runs)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--bw-gb", type=float, default=8.0, help="buffer for the bandwidth measurement (GB)")
    p.add_argument("--isa", default=None, help="force the engine's kernels (generic, avx2, avx512, amx, amx-emu)")
    p.add_argument(
        "--prefill-rows",
        type=int_list,
        default=[0],
        help="rows per task of the prefill kernels, comma list to compare (0: automatic; else multiples of 64)",
    )
    p.add_argument("--kt", choices=("auto", "off"), default="auto", help="compare kt-kernel when importable")
    p.add_argument("--json", default=None, help="write machine, rows and table as JSON here")
    p.add_argument("--kt-child", default=None, help=argparse.SUPPRESS)  # internal: shape,format,threads
    args = p.parse_args(argv)
    if args.kt_child:  # one kt-kernel process (bench_kt_isolated): rows to stdout, nothing else
        shape_key, fmt, t = args.kt_child.split(",")
        rows: list = []
        bench_kt(SHAPES[shape_key], fmt, args, int(t), rows)
        for r in rows:
            print(KT_ROW + json.dumps(r), flush=True)
        return 0

    shapes = [s for s in args.shapes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for f in formats:
        if f not in FORMATS:
            p.error(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    if any(r < 0 or r % 64 or r > 1024 for r in args.prefill_rows) or not args.prefill_rows:
        p.error("--prefill-rows takes 0 (automatic) or multiples of 64 up to 1024")
    if any(t < 1 for t in args.tokens) or args.repeats < 1 or args.warmup < 0:
        p.error("--tokens must be >= 1, --repeats >= 1, --warmup >= 0")
    if args.experts is not None:
        small = [SHAPES[s].name for s in shapes if SHAPES[s].top_k > args.experts]
        if small:
            p.error(f"--experts {args.experts} is below top-k of {', '.join(small)}")
    threads = args.threads or [len(os.sched_getaffinity(0))]

    log(f"tandem CPU MoE benchmark: {platform.processor() or platform.machine()}, isa {cpu.isa_info()}")
    mach = machine(threads, args.bw_gb)
    rows: list = []
    for s in shapes:
        for f in formats:
            for t in threads:
                bench_engine(SHAPES[s], f, args, mach, t, rows)
                if args.kt == "auto":
                    bench_kt_isolated(s, f, kt_argv(argv if argv is not None else sys.argv[1:]), t, rows)
    print_table(rows, mach)
    if args.json:
        result = {
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "args": vars(args),
            "shapes": {s: asdict(SHAPES[s]) for s in shapes},
            "machine": mach,
            "isa": cpu.isa_info(),
            "rows": rows,
            "table": best_rows(rows),
        }
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
