"""Paged decode attention on one GPU: the Triton kernels (tandem/ops/triton/attention.py) against the
torch path the layers take without them (per sequence: gather the context's cache rows, attend in
torch with fp32 math, as tandem/layers/attention.py's loop does).

Shapes: DeepSeek-V3 MLA (128 heads, latent 512 + rope 64), DeepSeek-V2-Lite MLA (16 heads, same
cache rows), Qwen3-30B-A3B GQA (32 query heads, 4 kv heads of 128). bf16 cache, one decode query per
sequence at the end of its context, block tables shuffled over the whole cache as a busy server's
are. Every timed call starts with L2 flushed (a 256 MB write), as a decode step's attention finds
it after the layer's weights went through.

Per row: median time over --reps calls with CUDA events of the kernels called eagerly, of the same
call replayed from a CUDA graph, and of the torch path; GB/s = distinct cache bytes the step must
read (every sequence's context rows once; MLA heads share them) / kernel time, and that as a % of
this GPU's device-to-device copy rate measured first; err = max |kernel - torch| / max |torch|.
num_splits comes from default_splits (the caller's rule), shown in the `splits` column.

    python benchmarks/gpu_attention.py --json gpu_attention.json
    python benchmarks/gpu_attention.py --tune    # tile configs / split counts around the defaults
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tandem.ops import reference  # noqa: E402
from tandem.ops.triton import attention as attn  # noqa: E402


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # "mla" | "gqa"
    heads: int
    kv_heads: int  # GQA key/value heads (MLA: 1, the shared latent)
    dim: int  # MLA: kv_lora_rank; GQA: head_dim
    rope_dim: int = 0  # MLA only

    @property
    def width(self) -> int:
        return self.dim + self.rope_dim if self.kind == "mla" else 2 * self.kv_heads * self.dim

    @property
    def scale(self) -> float:
        return (128 + self.rope_dim) ** -0.5 if self.kind == "mla" else self.dim**-0.5


MODELS = {
    "v3": Model("DeepSeek-V3 MLA", "mla", 128, 1, 512, 64),
    "v2-lite": Model("DeepSeek-V2-Lite MLA", "mla", 16, 1, 512, 64),
    "qwen3": Model("Qwen3-30B-A3B GQA", "gqa", 32, 4, 128),
}
# --tune: tile configs tried on a few rows (block_h, block_n, num_warps, num_stages).
TUNE_CONFIGS = {
    "mla": [(16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2), (16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 3), (64, 16, 8, 2)],
    "gqa": [(16, 64, 4, 2), (16, 32, 4, 2), (16, 64, 4, 3), (16, 128, 8, 2), (16, 64, 8, 2), (16, 32, 2, 2)],
}
TUNE_ROWS = [("v3", 1, 32768), ("v3", 16, 8192), ("v2-lite", 1, 32768), ("qwen3", 1, 32768), ("qwen3", 16, 8192)]

_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Timer:
    """Median CUDA-event time of fn() in microseconds, each call after an L2 flush."""

    def __init__(self, flush_mb: int = 256):
        self.flush = torch.empty(flush_mb << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, reps: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def copy_rate(timer: Timer) -> float:
    """Device-to-device copy GB/s (bytes read + written), this GPU's practical bandwidth."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() / us / 1e3


class Step:
    """One decode step: `batch` sequences of `ctx` tokens in shuffled blocks of a shared cache, one query each."""

    def __init__(self, model: Model, cache: torch.Tensor, block_size: int, batch: int, ctx: int, gen: torch.Generator):
        self.model, self.cache, self.block_size, self.batch, self.ctx = model, cache, block_size, batch, ctx
        dev = cache.device
        nblk = -(-ctx // block_size)
        num_blocks = cache.shape[0] // block_size
        ids = torch.randperm(num_blocks, generator=gen)[: batch * nblk]
        self.block_tables = ids.view(batch, nblk).to(torch.int32).to(dev)
        self.seq_of_token = torch.arange(batch, dtype=torch.int32, device=dev)
        self.positions = torch.full((batch,), ctx - 1, dtype=torch.int64, device=dev)
        width = model.dim + model.rope_dim if model.kind == "mla" else model.dim
        q = torch.randn(batch, model.heads, width, generator=gen).to(cache.dtype).to(dev)
        self.q, self.q_pe = (q[..., : model.dim], q[..., model.dim :]) if model.kind == "mla" else (q, None)

    @property
    def cache_bytes(self) -> int:
        return self.batch * self.ctx * self.cache.shape[1] * self.cache.element_size()

    def splits(self, config=None) -> int:
        m = self.model
        sms = torch.cuda.get_device_properties(0).multi_processor_count if self.cache.is_cuda else 132
        return attn.default_splits(self.ctx, self.batch, m.heads, m.kv_heads, sms, config)

    def kernel(self, splits: int, config=None) -> torch.Tensor:
        m = self.model
        if m.kind == "mla":
            return attn.mla_decode(
                self.q, self.q_pe, self.cache, self.block_tables, self.seq_of_token, self.positions,
                self.block_size, m.scale, splits, config=config,
            )
        return attn.gqa_decode(
            self.q, self.cache, self.block_tables, self.seq_of_token, self.positions, self.block_size, m.scale,
            m.kv_heads, splits, config=config,
        )

    def torch_path(self) -> torch.Tensor:
        """The layers' loop: per sequence, the context's rows gathered, then fp32 torch math."""
        m, bs = self.model, self.block_size
        out = torch.empty(self.batch, m.heads, m.dim, dtype=self.q.dtype, device=self.cache.device)
        offs = torch.arange(bs, device=self.cache.device)
        for s in range(self.batch):
            rows = (self.block_tables[s].long()[:, None] * bs + offs).reshape(-1)[: self.ctx]
            ctx = self.cache[rows]
            if m.kind == "mla":  # reference.mla_attention_absorbed without the W_UK / W_UV products
                lat, kpe = ctx.float().split([m.dim, m.rope_dim], dim=-1)
                scores = torch.einsum("qhc,kc->hqk", self.q[s : s + 1].float(), lat)
                scores = scores + torch.einsum("qhr,kr->hqk", self.q_pe[s : s + 1].float(), kpe)
                probs = (scores * m.scale).softmax(dim=-1)
                out[s] = torch.einsum("hqk,kc->qhc", probs, lat)[0].to(out.dtype)
            else:  # what GQAttention calls
                k, v = ctx.view(-1, 2, m.kv_heads, m.dim).unbind(1)
                out[s] = reference.attention(self.q[s : s + 1], k, v, m.scale, self.ctx - 1)[0]
        return out


def graph_of(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiled and warm before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def make_cache(model: Model, rows: int, gen_seed: int) -> torch.Tensor:
    torch.manual_seed(gen_seed)
    return torch.randn(rows, model.width, device="cuda").to(torch.bfloat16)


def run_rows(args, timer: Timer, copy_gbs: float) -> list[dict]:
    rows = []
    max_rows = max(args.batches) * max(args.contexts) + max(args.block_sizes) * max(args.batches)
    for key in args.models:
        model = MODELS[key]
        cache = make_cache(model, max_rows, 0)
        for bs in args.block_sizes:
            for batch in args.batches:
                for ctx in args.contexts:
                    step = Step(model, cache, bs, batch, ctx, torch.Generator().manual_seed(batch * ctx + bs))
                    splits = step.splits()
                    out = step.kernel(splits)
                    ref = step.torch_path()
                    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
                    kernel_us = timer(lambda: step.kernel(splits), args.reps)
                    graph = graph_of(lambda: step.kernel(splits))
                    graph_us = timer(graph.replay, args.reps)
                    torch_us = timer(step.torch_path, max(3, args.reps // 5), warmup=1)
                    gbs = step.cache_bytes / graph_us / 1e3
                    row = dict(
                        model=model.name, batch=batch, context=ctx, block_size=bs, splits=splits,
                        kernel_us=kernel_us, graph_us=graph_us, torch_us=torch_us, speedup=torch_us / graph_us,
                        cache_mb=step.cache_bytes / 1e6, gbs=gbs, pct_copy=100 * gbs / copy_gbs, err=err,
                    )
                    rows.append(row)
                    log(f"{model.name} b{batch} ctx {ctx} bs {bs}: splits {splits}, kernel {kernel_us:.1f} us, "
                        f"graph {graph_us:.1f} us, torch {torch_us:.1f} us, {gbs:.0f} GB/s, err {err:.1e}")
        del cache
        torch.cuda.empty_cache()
    return rows


def run_tune(args, timer: Timer) -> list[dict]:
    """Each TUNE_ROWS row at block size 16: every TUNE_CONFIGS entry at the default splits, and the
    default config at half and twice the default splits."""
    results = []
    for key, batch, ctx in TUNE_ROWS:
        model = MODELS[key]
        cache = make_cache(model, batch * ctx + 16 * batch, 1)
        step = Step(model, cache, 16, batch, ctx, torch.Generator().manual_seed(7))
        trials = []
        for bh, bn, warps, stages in TUNE_CONFIGS[model.kind]:
            cfg = attn.DecodeConfig(block_h=bh, block_n=bn, num_warps=warps, num_stages=stages)
            trials.append((cfg, step.splits(cfg)))
        default = attn.default_config(model.dim)
        base = step.splits(default)
        trials += [(default, max(1, base // 2)), (default, base * 2)]
        for cfg, splits in trials:
            try:
                us = timer(lambda: step.kernel(splits, cfg), args.reps)
            except Exception as e:  # a config the GPU cannot hold (shared memory, registers)
                log(f"tune {model.name} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            results.append(dict(model=model.name, batch=batch, context=ctx, splits=splits, **asdict(cfg), us=us,
                                gbs=step.cache_bytes / us / 1e3, default=cfg == default and splits == base))
            log(f"tune {model.name} b{batch} ctx {ctx}: {cfg} splits {splits}: {us:.1f} us")
        del cache
        torch.cuda.empty_cache()
    return results


def print_table(rows: list[dict], copy_gbs: float, device: str) -> None:
    print(f"\n{device}; device copy {copy_gbs:.0f} GB/s (read + write)")
    head = f"{'model':22} {'batch':>5} {'ctx':>6} {'bs':>3} {'splits':>6} {'kernel us':>10} {'graph us':>9} " \
           f"{'torch us':>10} {'x torch':>8} {'cache MB':>9} {'GB/s':>6} {'% copy':>7} {'err':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:22} {r['batch']:5d} {r['context']:6d} {r['block_size']:3d} {r['splits']:6d} "
              f"{r['kernel_us']:10.1f} {r['graph_us']:9.1f} {r['torch_us']:10.1f} {r['speedup']:8.1f} "
              f"{r['cache_mb']:9.1f} {r['gbs']:6.0f} {r['pct_copy']:6.0f}% {r['err']:8.1e}")


def print_tune(results: list[dict]) -> None:
    print("\ntune (block size 16): best per row vs the default config and splits")
    print(f"{'model':22} {'batch':>5} {'ctx':>6} {'default us':>10} {'best us':>8}  best config")
    keys = sorted({(r["model"], r["batch"], r["context"]) for r in results}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        trials = [r for r in results if (r["model"], r["batch"], r["context"]) == key]
        best = min(trials, key=lambda r: r["us"])
        default = next((r["us"] for r in trials if r["default"]), float("nan"))
        cfg = (f"block_h {best['block_h']} block_n {best['block_n']} warps {best['num_warps']} "
               f"stages {best['num_stages']} splits {best['splits']}")
        print(f"{key[0]:22} {key[1]:5d} {key[2]:6d} {default:10.1f} {best['us']:8.1f}  {cfg}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS), help=f"of {','.join(MODELS)}")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 8192, 32768])
    p.add_argument("--block-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--max-err", type=float, default=3e-2, help="exit 1 if kernel and torch outputs differ more")
    p.add_argument("--tune", action="store_true", help="also time tile configs and split counts (adds ~60 s)")
    p.add_argument("--json", help="write rows (and tune results) here")
    args = p.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("needs a CUDA GPU and compiled kernels (unset TRITON_INTERPRET)")
    unknown = set(args.models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")

    device = torch.cuda.get_device_name(0)
    timer = Timer()
    copy_gbs = copy_rate(timer)
    log(f"{device}: device copy {copy_gbs:.0f} GB/s")
    rows = run_rows(args, timer, copy_gbs)
    tune = run_tune(args, timer) if args.tune else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_gbs=copy_gbs, rows=rows, tune=tune, torch=torch.__version__,
                           triton=__import__("triton").__version__), f, indent=1)
    if tune:
        print_tune(tune)
    print_table(rows, copy_gbs, device)
    bad = [r for r in rows if not r["err"] <= args.max_err]
    if bad:
        raise SystemExit(f"{len(bad)} rows disagree with the torch path (err > {args.max_err}): the kernels are wrong")


if __name__ == "__main__":
    main()
