"""Hot experts' decode kernels on the GPU: float copies (ops/triton/moe.py) against the model file's
blocks as stored (ops/triton/moe_quant.py) and as split rows with int8 activations
(ops/triton/moe_q8.py, what hot experts of Q4_K / Q6_K / Q8_0 run), one model shape's T tokens
routed to k experts per layer.

Each timed call runs --layers layers of distinct weights (so L2 holds none), captured once in a CUDA
graph and replayed (as the decode step runs them). Per row: us per layer, MB of expert weights a
layer reads (each routed expert once per slot), TB/s, that as a % of the device-to-device copy
rate measured first, and err: max |out - reference| / max |reference| on layer 0 (x and out bf16, as
decode runs them: one bf16 rounding, 2^-8, beside fp32 order), whose routed
experts hold real quantized weights (reference.moe_experts in fp32 on their dequantization; the
bf16 rows against the same in bf16 copies; the split rows' int8 activations add ~1%). --tiles sweeps
the block kernels' rows x warps.

    python benchmarks/hot_kernels.py --shape v2-lite --json hot_kernels.json
    python benchmarks/hot_kernels.py --shape v3 --tiles 8x2,16x4,32x4
On a CPU (tests) the kernels run in Triton's interpreter, timed without graphs: --device cpu --dims 256,256,4,2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_quant_matmul's CUDA-graph timing

# (H, I, experts, k, gate/up format, down format as a Q4_K_M file stores them)
SHAPES = {
    "v2-lite": (2048, 1408, 64, 6, "Q4_K", "Q8_0"),  # I % 256 != 0: down takes Q6_K's fallback
    "v3": (7168, 2048, 256, 8, "Q4_K", "Q6_K"),
    "qwen3": (2048, 768, 128, 8, "Q4_K", "Q6_K"),
}


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of one call of fn: replayed from a CUDA graph on a GPU, plainly on a CPU."""
    if device.type == "cuda":
        from gpu_quant_matmul import graph_times  # imports the kernels: not before main set the interpreter

        return graph_times(fn, calls=1, replays=reps)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_rate(device: torch.device) -> float | None:
    """Device-to-device copy, bytes read per second (the HBM reference), GPU only."""
    if device.type != "cuda":
        return None
    from gpu_quant_matmul import copy_bandwidth

    return copy_bandwidth() / 2 * 1e9  # it counts bytes read + written


def tile_list(text: str) -> list[tuple[int, int]]:
    """"8x2,16x4" -> [(8, 2), (16, 4)]: rows (a power of two) x warps."""
    try:
        tiles = [tuple(int(v) for v in t.split("x")) for t in text.split(",") if t]
    except ValueError:
        tiles = []
    if not tiles or any(len(t) != 2 or t[0] < 1 or t[0] & (t[0] - 1) or t[1] < 1 for t in tiles):
        raise argparse.ArgumentTypeError(f"expected rows x warps like 8x2,16x4 (rows a power of two), got {text!r}")
    return tiles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="v2-lite", choices=SHAPES)
    p.add_argument("--dims", default=None, help="H,I,experts,k instead of the shape's (small runs)")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--layers", type=int, default=26, help="layers of distinct weights per timed call")
    p.add_argument("--tiles", default="8x2,16x4", type=tile_list,
                   help="block kernels' rows x warps to time, comma list")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    from tandem.ops import reference
    from tandem.ops.split_rows import SPLIT_FORMATS, split_rows
    from tandem.ops.triton import moe, moe_q8, moe_quant
    from tandem.ops.triton.quant import row_bytes
    from tandem.weights import quant as wq

    hidden, inter, n_exp, top_k, gu_fmt, d_fmt = SHAPES[args.shape]
    if args.dims:
        hidden, inter, n_exp, top_k = (int(v) for v in args.dims.split(","))
    n_layers, n_tok = args.layers, args.tokens
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    picked = torch.stack([torch.randperm(n_exp, generator=gen)[:top_k] for _ in range(n_tok)])
    # Only routed experts are ever read, and a kernel's time does not depend on the others: hold
    # just those (numbered 0..n-1), so a V3 layer takes 8 experts' bytes, not 256.
    routed = sorted(set(picked.flatten().tolist()))
    ids = torch.tensor([[routed.index(e) for e in tok] for tok in picked.tolist()], dtype=torch.int32)
    n_held = len(routed)
    weights = torch.rand(n_tok, top_k, generator=gen)
    x = torch.randn(n_tok, hidden, generator=gen).to(torch.bfloat16)
    torch.manual_seed(args.seed)

    def blocks(rows: int, k: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Random bytes [L, n_held, rows, row_bytes] (values do not matter for time), layer 0 real
        blocks; and layer 0's dequantization [n_held, rows, k]."""
        data = torch.randint(0, 256, (n_layers, n_held, rows, row_bytes(fmt, k)), dtype=torch.uint8, device=device)
        w = (rng.standard_normal((n_held * rows, k)) / k**0.5).astype(np.float32)
        q = wq.quantize(w, fmt)
        data[0] = torch.from_numpy(q).view(n_held, rows, -1).to(device)
        return data, torch.from_numpy(wq.dequantize(q, fmt, w.shape)).view(n_held, rows, k)

    print(f"{args.shape if not args.dims else args.dims}: H {hidden}, I {inter}, {n_exp} experts, top-{top_k}, "
          f"{n_tok} token(s), {n_layers} layers; blocks {gu_fmt}/{gu_fmt}/{d_fmt}", file=sys.stderr)
    gate, gate_f = blocks(inter, hidden, gu_fmt)
    up, up_f = blocks(inter, hidden, gu_fmt)
    down, down_f = blocks(hidden, inter, d_fmt)
    xd, idd, wd = x.to(device), ids.to(device), weights.to(device)
    want = reference.moe_experts(x.float(), ids, weights, gate_f, up_f, down_f)
    slots = n_tok * top_k
    block_mb = slots * (2 * gate.shape[3] * inter + down.shape[3] * hidden) / 1e6  # [L, N, rows, row_bytes]
    float_mb = slots * 3 * hidden * inter * 2 / 1e6
    rate = copy_rate(device)
    rows = []

    def row(name: str, fn, mb: float, ref: torch.Tensor) -> None:
        err = float((fn(0).float().cpu() - ref).abs().max() / ref.abs().max())
        us = timed(lambda: [fn(layer) for layer in range(n_layers)], args.reps, device) / n_layers * 1e6
        tbs = mb / us
        rows.append({"kernels": name, "us_per_layer": us, "mb_per_layer": mb, "tb_s": tbs,
                     "pct_copy": 100 * tbs * 1e12 / rate if rate else None, "err": err})

    default_tiles = moe_quant._BLOCK_N, moe_quant._NUM_WARPS
    try:
        for bn, warps in args.tiles:
            moe_quant._BLOCK_N, moe_quant._NUM_WARPS = bn, warps
            row(f"blocks {bn} rows x {warps} warps", lambda layer: moe_quant.moe_decode_blocks(
                xd, idd, wd, gate[layer], up[layer], down[layer], gu_fmt, gu_fmt, d_fmt), block_mb, want)
    finally:  # the module's own tiles again (tests import it into a process that goes on)
        moe_quant._BLOCK_N, moe_quant._NUM_WARPS = default_tiles
    if {gu_fmt, d_fmt} <= set(SPLIT_FORMATS):  # what hot experts of these formats run
        split = [split_rows(t, f) for t, f in ((gate, gu_fmt), (up, gu_fmt), (down, d_fmt))]
        split_mb = slots * (2 * split[0].shape[3] * inter + split[2].shape[3] * hidden) / 1e6
        row("split rows, int8 x", lambda layer: moe_q8.moe_decode_split(
            xd, idd, wd, *(t[layer] for t in split), gu_fmt, gu_fmt, d_fmt), split_mb, want)
        del split
    del gate, up, down
    bf = dict(dtype=torch.bfloat16, device=device)
    w_gate = torch.empty(n_layers, n_held, inter, hidden, **bf).normal_(0, hidden**-0.5)
    w_up = torch.empty(n_layers, n_held, inter, hidden, **bf).normal_(0, hidden**-0.5)
    w_down = torch.empty(n_layers, n_held, hidden, inter, **bf).normal_(0, inter**-0.5)
    for w, f in ((w_gate, gate_f), (w_up, up_f), (w_down, down_f)):
        w[0] = f.to(**bf)
    want_bf16 = reference.moe_experts(x, ids, weights, *(f.to(torch.bfloat16) for f in (gate_f, up_f, down_f))).float()
    row("float (bf16 copies)", lambda layer: moe.moe_decode(xd, idd, wd, w_gate[layer], w_up[layer], w_down[layer]),
        float_mb, want_bf16)

    print(f"\nhot-expert kernels, {args.device}" + (f": device copy {rate / 1e12:.2f} TB/s read" if rate else ""))
    print(f"{'kernels':28s} {'us/layer':>9s} {'MB/layer':>9s} {'TB/s':>6s} {'% copy':>7s} {'err':>8s}")
    for r in rows:
        pct = f"{r['pct_copy']:6.0f}%" if r["pct_copy"] is not None else "      -"
        print(f"{r['kernels']:28s} {r['us_per_layer']:9.1f} {r['mb_per_layer']:9.1f} {r['tb_s']:6.2f} {pct} "
              f"{r['err']:8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "copy_bytes_per_s": rate, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
