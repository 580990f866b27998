"""`tandem convert --synth ARCH` (shape-true synthetic GGUF) and `tandem bench MODEL` (speed vs bounds)."""

import argparse
import os
import shlex
import sys

from tandem.cli.args import check_output, check_path, check_threads, hot_count, step_tokens
from tandem.errors import TandemError

ARCH_NAMES = ("deepseek-v3", "deepseek-v2-lite", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b")


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="write a synthetic GGUF with a real model's tensors (random weights)")
    p.add_argument("--synth", required=True, choices=ARCH_NAMES, help="architecture whose shapes to copy")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write (e.g. /dev/shm/v3-4.gguf)")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    p.add_argument("--qtype", default="Q4_K_M", choices=("Q4_K_M", "Q8_0", "BF16"), help="default: Q4_K_M")
    p.add_argument("--router-skew", type=float, default=0.0,
                   help="make some experts hot: row r of each router scaled by 1 + S/(1 + r) (default 0: uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix-depth", default="full", choices=("full", "truncated"),
                   help="quant mix of the full model's first N layers (default) or of an N-layer model")
    p.add_argument("--scale", type=int, default=1, help="debug: N times narrower, NOT the real shapes (tests)")
    p.add_argument("--threads", type=int, default=None, help="generator threads (default: all cores)")


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="prefill / decode speed beside this machine's measured bounds")
    p.add_argument("model", nargs="?", help="HF model directory or GGUF model")
    p.add_argument("--extrapolate", nargs=2, metavar=("A.gguf", "B.gguf"),
                   help="two truncations of one model: also estimate the full depth")
    p.add_argument("--full-layers", type=int, default=None,
                   help="with --extrapolate on non-synthetic files: the full model's layer count")
    p.add_argument("--prompts", default="512,2048,8192", help="prefill prompt lengths (default 512,2048,8192)")
    p.add_argument("--context", type=int, default=1024, help="context before the timed decode (default 1024)")
    p.add_argument("--decode-tokens", type=int, default=128, help="timed decode tokens (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, medians reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up passes (default 1)")
    p.add_argument("--users", type=int, default=0, help="also time N concurrent decode streams (e.g. 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the expert engine")
    p.add_argument("--device", default="cpu", help="device for the non-expert layers: cpu or cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--experts-format", default="bf16", choices=("bf16", "int8", "int4"),
                   help="what float-checkpoint experts become (GGUF experts keep their blocks)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="decode eagerly instead of replaying CUDA graphs")
    p.add_argument("--no-look-ahead", dest="look_ahead", action="store_false",
                   help="wait for each decode step's tokens before queuing the next (default: queue it first)")
    p.add_argument("--no-dual-prefill", dest="dual_prefill", action="store_false",
                   help="prefill with the CPU engine alone (default with a GPU: each layer's experts split with it)")
    p.add_argument("--kv-cache", default="auto", choices=("auto", "int8"), help="KV cache format (default: auto)")
    p.add_argument("--max-step-tokens", type=step_tokens, default="auto", metavar="N|auto",
                   help="tokens per step: prompts longer than this prefill in chunks (default auto: as chat "
                        "and serve choose, the largest step up to 8192 whose workspace fits)")
    p.add_argument("--gpu-experts", type=hot_count, default=0, metavar="N|auto",
                   help="hot experts per MoE layer on the GPU (default 0: all routed experts in CPU RAM)")
    p.add_argument("--bw-gb", type=float, default=4.0, help="DRAM probe buffer in GB (default 4; TARGETS uses 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure as JSON here")
    p.add_argument("--plot", help="write tok/s vs prompt length with the bounds as a PNG here")
    p.add_argument("--profile", action="store_true", help="time per layer: attention, experts, shared, other")
    p.add_argument("--peer", choices=("llama.cpp",), help="measure llama.cpp the same way")
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench binary (default: on PATH)")


def _bench_parser() -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser().add_subparsers()
    add_bench_parser(sub)
    return sub.choices["bench"]


def _defaults() -> argparse.Namespace:
    return _bench_parser().parse_args([])


def _prompts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TandemError(f"--prompts takes comma-separated token counts, e.g. 512,2048,8192; got {text!r}") from None


MAX_PROBE_GB = 1024  # the DRAM probe's buffer where the RAM available is unknown


def _check_plot_format(path: str) -> None:
    """matplotlib writes the format the name's suffix says (no suffix: PNG); refuse others before measuring."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise TandemError("--plot needs matplotlib: pip install 'tandem[bench]'") from None
    suffix = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise TandemError(f"--plot cannot write .{suffix} files; give a name ending in one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option that differs from its default)."""
    parts = ["tandem", "bench"] + ([shlex.quote(args.model)] if args.model else [])
    parser = _bench_parser()
    defaults = vars(parser.parse_args([]))
    # Options that take no value (store_true / store_false: --no-cuda-graph sets cuda_graph False).
    switches = {a.dest: a.option_strings[0] for a in parser._actions if a.nargs == 0 and a.option_strings}
    for key, value in vars(args).items():
        if key in ("command", "model") or key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if key in switches:
            parts.append(switches[key])
        elif isinstance(value, (list, tuple)):
            parts += [flag, *(shlex.quote(str(v)) for v in value)]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


MAX_SCALE = 256  # every architecture's shapes are at their floor by then
MAX_ROUTER_SKEW = 1e6  # S = 8 already makes the hottest expert ~10x the uniform rate


def run_convert(args: argparse.Namespace) -> int:
    from tandem.testing.synth import write_synth

    check_output("-o/--output", args.output)
    check_threads("--threads", args.threads)
    if not 0 <= args.router_skew <= MAX_ROUTER_SKEW:  # also refuses nan
        raise TandemError(f"--router-skew must be in 0..{MAX_ROUTER_SKEW:g}, got {args.router_skew}")
    if not 0 <= args.seed < 2**32:  # the file records it as a uint32
        raise TandemError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    if not 1 <= args.scale <= MAX_SCALE:
        raise TandemError(f"--scale must be in 1..{MAX_SCALE} (shapes stop shrinking before that), got {args.scale}")
    try:
        w = write_synth(args.output, args.synth, args.layers, args.qtype, seed=args.seed, router_skew=args.router_skew,
                        scale=args.scale, mix_depth=args.mix_depth, threads=args.threads, progress=sys.stderr.isatty())
    except OSError as e:  # cannot create or fill the file (a read-only place, a full disk): the writer cleaned up
        raise TandemError(f"cannot write {args.output}: {e.strerror}") from None
    m = w.model
    print(f"wrote {w.path}: {m.arch} {m.layers}/{m.full_layers} layers ({m.dense_layers} dense, {m.moe_layers} MoE), "
          f"{m.qtype}, {len(m.tensors)} tensors, {w.nbytes / 1e9:.2f} GB in {w.seconds:.1f} s ({w.gb_per_s:.2f} GB/s)")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from tandem.bench import report
    from tandem.bench.measure import BenchConfig
    from tandem.bench.suite import bench
    from tandem.placement.advice import available_ram
    from tandem.placement.rules import check_device

    if (args.model is None) == (args.extrapolate is None):
        raise TandemError("give a MODEL, or --extrapolate A.gguf B.gguf (not both)")
    for path in [args.model, *(args.extrapolate or ())]:
        check_path("model path", path)
    ram = available_ram()
    limit = ram / 1e9 if ram else MAX_PROBE_GB
    if not 0 < args.bw_gb <= limit:  # also refuses nan and inf
        raise TandemError(f"--bw-gb must be > 0 and fit in the RAM available ({limit:.1f} GB), got {args.bw_gb}")
    if args.full_layers is not None and args.extrapolate is None:
        raise TandemError("--full-layers (the full model's layer count) goes with --extrapolate A.gguf B.gguf")
    if args.full_layers is not None and args.full_layers < 1:
        raise TandemError(f"--full-layers must be >= 1 (the full model's layer count), got {args.full_layers}")
    if args.seed < 0:
        raise TandemError(f"--seed must be >= 0, got {args.seed}")
    check_device(args.device)
    check_threads("--threads", args.threads)
    check_output("--json", args.json)
    check_output("--plot", args.plot)
    if args.plot:
        _check_plot_format(args.plot)
    cfg = BenchConfig(model=args.model or args.extrapolate[0], prompts=_prompts(args.prompts), context=args.context,
                      decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                      device=args.device, dtype=args.dtype, users=args.users, seed=args.seed,
                      experts_format=args.experts_format, cuda_graph=args.cuda_graph, look_ahead=args.look_ahead,
                      max_step_tokens=args.max_step_tokens, gpu_experts=args.gpu_experts,
                      dual_prefill=args.dual_prefill, kv_cache=args.kv_cache)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = bench(cfg, extrapolate=tuple(args.extrapolate) if args.extrapolate else None, profile=args.profile,
                   peer=args.peer, llama_bench=args.llama_bench, full_layers=args.full_layers,
                   bw_bytes=int(args.bw_gb * 1e9), progress=sys.stderr.isatty(), command=_command(args), log=log)
    try:
        if args.json:
            report.write_json(result, args.json)
        if args.plot:
            report.plot(result, args.plot)
    except OSError as e:  # checked before measuring; this is the disk filling up or the folder going away
        raise TandemError(f"cannot write {e.filename or 'the results'}: {e.strerror}") from None
    print(report.table(result))
    return 0
