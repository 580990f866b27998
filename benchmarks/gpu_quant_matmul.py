"""Triton matmul on GGUF blocks (tandem.ops.triton.quant) for DeepSeek-V3's non-expert shapes, vs torch bf16.

For each weight shape [N, K] x format x tokens M: the median time of one `quant_matmul` call and of
torch's bf16 `F.linear` on the same weights dequantized, both replayed from CUDA graphs (no launch
overhead; this also checks that every path is capturable). Decode rows (M <= 16) cycle through
copies of the weights that together exceed 4x the L2 cache, so weights come from HBM as in a real
model step. Weights are random bytes with sane fp16 scale fields (values do not matter for speed;
quantizing the 129280 x 7168 lm_head in numpy would take minutes).

Columns: GB/s = weight bytes read per second (decode rows), % copy = that against this GPU's
device-to-device copy bandwidth (read + write, measured first: roughly the attainable HBM
bandwidth), TFLOP/s = 2 M N K per second (prefill rows), vs bf16 = torch's time / ours (> 1: we
are faster), err = max |ours - torch| / max |torch| (bf16 rounding differences only: a few 1e-3).

    python benchmarks/gpu_quant_matmul.py --json gpu_quant_matmul.json
    python benchmarks/gpu_quant_matmul.py --formats Q4_K --tokens 1,2048 --shapes q_a,lm_head

Needs torch (CUDA) and triton only. Stops starting new rows after --budget-s seconds (default 85).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tandem.ops.triton import quant as tq

# DeepSeek-V3 weights that stay on the GPU: name -> (N, K) as in nn.Linear (out, in).
SHAPES = {
    "q_a": (1536, 7168),
    "q_b": (24576, 1536),
    "kv_a": (576, 7168),
    "o_proj": (7168, 16384),
    "shexp_gate_up": (2048, 7168),
    "shexp_down": (7168, 2048),
    "lm_head": (129280, 7168),
}
# Byte offsets of each block's fp16 scale fields, and a magnitude for them that keeps weights ~0.02.
SCALE_FIELDS = {
    "Q8_0": {0: 2e-4},
    "Q4_0": {0: 3e-3},
    "Q5_0": {0: 1.5e-3},
    "Q4_K": {0: 5e-5, 2: 5e-5},
    "Q5_K": {0: 2.5e-5, 2: 2.5e-5},
    "Q6_K": {208: 5e-6},
}
_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def random_blocks(fmt: str, n: int, k: int, seed: int) -> torch.Tensor:
    """Random uint8 blocks [n, row_bytes] on the GPU with finite, positive fp16 scales."""
    f = tq.format_of(fmt)
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // f.block_size, f.block_bytes), dtype=torch.uint8, device="cuda", generator=g)
    for offset, size in SCALE_FIELDS[fmt].items():
        scale = torch.rand(n, k // f.block_size, 1, device="cuda", generator=g) * size + size / 2
        blocks[:, :, offset:offset + 2] = scale.half().view(torch.uint8)
    return blocks.view(n, -1)


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s of bytes read + written (1 GiB buffers)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = graph_times(functools.partial(dst.copy_, src), calls=2, replays=5)
    return 2 * (1 << 30) / seconds / 1e9


def graph_times(fn, calls: int, replays: int) -> float:
    """Median seconds per call of `fn`, `calls` calls captured in one CUDA graph, `replays` replays."""
    fn()  # compiles Triton kernels, initializes cuBLAS: never inside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # warm-up
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(samples)


class Cycle:
    """Calls fn(x, operands[i], *rest) with i = 0, 1, ... wrapping: consecutive graph calls read
    different copies of the weights."""

    def __init__(self, fn, x: torch.Tensor, operands: list, *rest):
        self.fn, self.x, self.operands, self.rest, self.i = fn, x, operands, rest, 0

    def __call__(self):
        out = self.fn(self.x, self.operands[self.i % len(self.operands)], *self.rest)
        self.i += 1
        return out


def path_of(m: int) -> str:
    return "gemv" if m == 1 else "mma16" if m <= 16 else "tiled"


def bench_shape(name: str, fmt: str, args, l2: int, torch_cache: dict, rows: list) -> None:
    n, k = SHAPES[name]
    one = tq.row_bytes(fmt, k) * n
    decode_copies = max(1, min(args.max_copies, math.ceil(4 * l2 / one)))
    blocks = [random_blocks(fmt, n, k, seed) for seed in range(decode_copies)]
    weight = tq.dequantize(blocks[0], fmt, torch.bfloat16)  # torch's operand; also a correctness reference
    for m in args.tokens:
        if time.perf_counter() - _START > args.budget_s:
            rows.append(dict(shape=name, format=fmt, M=m, skipped="time budget"))
            continue
        row = dict(shape=name, N=n, K=k, format=fmt, M=m, path=path_of(m), weight_bytes=one)
        try:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            copies = decode_copies if m <= 16 else 1
            calls = max(copies, 4) if m <= 16 else 2
            ours = graph_times(Cycle(tq.quant_matmul, x, blocks[:copies], fmt), calls, args.replays)
            key = (name, m)
            if key not in torch_cache:
                bf16_copies = max(1, min(args.max_copies, math.ceil(4 * l2 / (2 * n * k)))) if m <= 16 else 1
                weights = [weight] + [weight.clone() for _ in range(bf16_copies - 1)]
                torch_cache[key] = graph_times(Cycle(F.linear, x, weights), calls, args.replays)
                del weights
            ref = F.linear(x, weight).float()
            err = float((tq.quant_matmul(x, blocks[0], fmt).float() - ref).abs().max() / ref.abs().max())
            row.update(ours_us=ours * 1e6, bf16_us=torch_cache[key] * 1e6, vs_bf16=torch_cache[key] / ours,
                       gbps=one / ours / 1e9, tflops=2 * m * n * k / ours / 1e12, err=err)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - keep going: one bad row must not lose the table
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
        log(f"{name:14} {fmt} M={m:<5} " + (f"{row['ours_us']:9.1f} us" if "ours_us" in row else row["error"]))
    del blocks, weight
    torch.cuda.empty_cache()


def table(rows: list, copy_gbps: float) -> str:
    head = f"{'shape':14} {'N x K':>13} {'fmt':5} {'M':>5} {'path':6} {'ours us':>9} {'bf16 us':>9} {'vs bf16':>7} " \
           f"{'GB/s':>7} {'% copy':>6} {'TFLOP/s':>8} {'err':>8}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        label = f"{r['shape']:14} {r.get('N', 0):>6}x{r.get('K', 0):<6} {r['format']:5} {r['M']:>5} {path_of(r['M']):6}"
        if "ours_us" not in r:
            lines.append(f"{label} {r.get('error') or r.get('skipped')}")
            continue
        decode = r["M"] <= 16
        gbps = f"{r['gbps']:7.0f} {100 * r['gbps'] / copy_gbps:5.0f}%" if decode else f"{'':7} {'':6}"
        tflops = f"{r['tflops']:8.1f}" if not decode else f"{'':8}"
        lines.append(f"{label} {r['ours_us']:9.1f} {r['bf16_us']:9.1f} {r['vs_bf16']:7.2f} {gbps} {tflops} {r['err']:8.1e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="Q4_K,Q6_K,Q8_0", help="comma list of " + ",".join(SCALE_FIELDS))
    parser.add_argument("--tokens", default="1,4,16,512,2048", help="comma list of M")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--replays", type=int, default=5, help="timed graph replays per row (median)")
    parser.add_argument("--max-copies", type=int, default=64, help="weight copies cycled by decode rows")
    parser.add_argument("--budget-s", type=float, default=85.0, help="start no new row after this many seconds")
    parser.add_argument("--json", help="write all rows and the device description here")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    log(f"{props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}")
    copy_gbps = copy_bandwidth()
    log(f"device copy bandwidth {copy_gbps:.0f} GB/s (read + write)")

    rows, torch_cache = [], {}
    for name in args.shapes.split(","):
        for fmt in args.formats.split(","):
            bench_shape(name, fmt.upper(), args, l2, torch_cache, rows)
    import triton

    report = dict(device=props.name, sms=props.multi_processor_count, l2_bytes=l2, torch=torch.__version__,
                  triton=triton.__version__, copy_gbps=copy_gbps, seconds=time.perf_counter() - _START, rows=rows)  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        log(f"wrote {args.json}")
    print(f"\n{props.name}: copy {copy_gbps:.0f} GB/s; ours vs torch bf16 F.linear on the dequantized weight")
    print(table(rows, copy_gbps))


if __name__ == "__main__":
    main()
