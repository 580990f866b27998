"""Experts backends bound at load: quantized GGUF blocks (BlockExperts) and the C++ CPU engine.

A pass over a model built on the meta device, before it gets storage: each `TorchExperts` whose
three merged expert tensors (ffn_{gate,up,down}_exps, [E, ...]) are in the checkpoint with the
expected shapes, at least one of them quantized, is replaced by a `BlockExperts` over the file's
raw blocks, so no float copy of those experts is ever allocated. Float-stored experts keep
`TorchExperts` and load like every other weight. Anything that does not fit is left for the
weight loader, which reports it with the other mapping problems.

Then `place_experts_on_cpu` moves every layer's routed experts into the C++ engine (the default
backend), leaving plain torch only where asked (`experts="torch"`).
"""

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from tandem.errors import TandemError
from tandem.layers.block_experts import BlockExperts, Blocks
from tandem.layers.moe import TorchExperts
from tandem.weights.gguf import torch_dequantizer

log = logging.getLogger(__name__)

# "layers.3.ffn.experts.w_gate" -> module "layers.3.ffn.experts", projection "gate"
_EXPERT_PARAM = re.compile(r"(?P<module>.+)\.w_(?P<proj>gate|up|down)")


def bind_block_experts(model: nn.Module, checkpoint: Any, rename: Callable[[str], str | None]) -> list[str]:
    """Swap in BlockExperts where the experts are quantized; returns the checkpoint names now served raw."""
    modules = dict(model.named_modules())
    found: dict[str, dict[str, str]] = {}  # experts module -> projection -> checkpoint name
    for name in checkpoint.names():
        m = _EXPERT_PARAM.fullmatch(rename(name) or "")
        if m and isinstance(modules.get(m["module"]), TorchExperts):
            found.setdefault(m["module"], {})[m["proj"]] = name
    kept = []
    for path, sources in found.items():
        experts = modules[path]
        fits = len(sources) == 3 and all(
            checkpoint.shape(n) == tuple(getattr(experts, f"w_{p}").shape) for p, n in sources.items()
        )
        if not fits or not any(checkpoint.is_quantized(n) for n in sources.values()):
            continue
        blocks = {
            p: Blocks(checkpoint.raw(n), checkpoint.qtype(n), torch_dequantizer(checkpoint.qtype(n)))
            for p, n in sources.items()
        }
        parent, attr = path.rsplit(".", 1)
        setattr(modules[parent], attr, BlockExperts(modules[parent].cfg, **blocks))
        kept += sources.values()
    return kept


FLOAT_FORMATS = ("bf16", "int8", "int4")  # what float-stored experts become in the CPU engine
# Idle engine workers spin this long before sleeping. CPU-only runs: short, because the same cores
# compute attention between two expert calls. With a GPU: long enough to span the GPU's part of a
# layer (and a step's end), because a job waits for every worker at its phase barriers and waking
# 14 sleeping workers is slow: measured on V2-Lite, H200 box, 14 threads, spin 100 / 400 / 1500 us:
# 23.0 / 33.5 / 48.9 tok/s, the engine's median time per layer 659 / 423 / 383 us (p90 5.4 ms /
# 2.2 ms / 0.49 ms). (Moving the other threads -- driver, Python -- off the workers' cores then
# changed nothing: 61.3 vs 60.8 tok/s.)
SPIN_US = 100
GPU_SPIN_US = 1500


def spin_us(gpu: bool) -> int:
    """GPU_SPIN_US or SPIN_US, or the TANDEM_SPIN_US environment variable (a tuning override)."""
    value = os.environ.get("TANDEM_SPIN_US", "")
    if not value:
        return GPU_SPIN_US if gpu else SPIN_US
    if not value.isdigit():
        raise TandemError(f"TANDEM_SPIN_US must be a count of microseconds >= 0, got {value!r}")
    return int(value)


# GPU runs leave these cores to the doorbell's thread (which spins between jobs and joins each job
# as one more worker) and to the thread driving the GPU.
GPU_FREE_CORES = 2


def create_cpu_engine(threads: int | None = None, gpu: bool = False) -> Any:
    """The runtime's CPU expert engine (worker threads pinned to this process's cores); `gpu`:
    a GPU runs the rest of the model (its workers spin longer; the stream reaches the engine through
    a doorbell where the driver has stream memory operations, else through host functions; by
    default the workers leave GPU_FREE_CORES cores free, since the doorbell's thread spins or works
    while a step runs, and one running beside a worker on its core stalls every job it joins)."""
    from tandem.ops import cpu

    if threads is not None and threads < 1:
        raise TandemError(f"--cpu-threads must be >= 1, got {threads}")
    cores = len(os.sched_getaffinity(0))
    if threads is None and gpu:
        threads = max(1, cores - GPU_FREE_CORES)
    elif gpu and cores > GPU_FREE_CORES and threads > cores - GPU_FREE_CORES:
        # Measured (H100 boxes, 16 cores, V2-Lite): 16 threads decode at 15 tok/s where 14 do 97;
        # 15 (and the doorbell joining) at 37 where 14 do 85.
        log.warning("%d CPU expert threads on %d cores leave fewer than %d to the GPU's driving and doorbell "
                    "threads: decode may be several times slower; %d threads would leave them", threads, cores,
                    GPU_FREE_CORES, cores - GPU_FREE_CORES)
    try:
        engine = cpu.create_engine(threads, spin_us=spin_us(gpu))
    except ValueError as e:
        raise TandemError(f"cannot start the CPU expert engine: {e}") from None
    if gpu:
        from tandem.ops.cuda_host import device_pointer, stream_memops

        why_not = stream_memops()
        if why_not:
            print(f"note: CPU experts run as host functions on the GPU stream ({why_not})", file=sys.stderr)
        else:  # the stream rings the engine's own thread: no host functions
            engine.doorbell = cpu.Doorbell(device_pointer=device_pointer)
    return engine


def place_experts_on_cpu(model: nn.Module, engine: Any, float_format: str = "bf16") -> int:
    """Move every MoE layer's routed experts into the CPU engine; returns how many layers moved.

    Float experts (TorchExperts) are repacked to `float_format` (BF16, or INT8 / INT4 quantized
    online); quantized GGUF experts (BlockExperts) go in as the file's blocks. Each layer's torch
    copy is dropped as soon as the engine holds it, so peak memory grows by one layer at most.
    """
    from tandem.layers.cpu_experts import CpuExperts
    from tandem.ops import cpu

    if float_format not in FLOAT_FORMATS:
        raise TandemError(f"unknown experts format {float_format!r}; choose one of {', '.join(FLOAT_FORMATS)}")
    supported = cpu.formats()
    moved = 0
    for name, module in list(model.named_modules()):
        experts = getattr(module, "experts", None)
        raw = False  # GGUF blocks: every format's bytes are already its row layout (BF16 too)
        if isinstance(experts, TorchExperts):
            fmts = (float_format.upper(),) * 3
            tensors = (experts.w_gate.data, experts.w_up.data, experts.w_down.data)
        elif isinstance(experts, BlockExperts):
            fmts = tuple(b.format for b in (experts.gate, experts.up, experts.down))
            if not all(f in supported for f in fmts):
                log.warning("%s: CPU engine has no kernel for %s; these experts stay on the slow torch path", name, fmts)
                continue
            tensors = (experts.gate.data, experts.up.data, experts.down.data)
            raw = True
        else:
            continue
        try:
            layer = cpu.add_layer(engine, fmts, *tensors, prequantized=raw)
        except (ValueError, TypeError) as e:  # e.g. a row length the format's blocks do not divide
            raise TandemError(f"cannot put {name}.experts in the CPU engine as {fmts[0]}: {e}") from None
        module.experts = CpuExperts(engine, layer, fmts)
        moved += 1
    return moved


DUAL_BUFFER_BYTES = 1 << 30  # the device memory a dual-path prefill step may use for copied experts


def enable_dual_prefill(model: nn.Module, buffer_bytes: int, register: bool = True) -> int:
    """Wrap every layer's CPU-engine experts in DualExperts (long steps split with the device);
    returns how many layers can; a layer the device cannot read stays as it is (logged). With
    `register` (a CUDA run), the engine's expert memory is page-locked now, as part of loading
    (seconds per 100 GB), not at the first long prompt."""
    from tandem.layers.cpu_experts import CpuExperts
    from tandem.layers.dual_experts import DualExperts
    from tandem.layers.dual_rates import SharedRates
    from tandem.layers.moe import MoE

    wrapped, kept, locked, seconds, last = 0, {}, 0, 0.0, None
    shared = SharedRates()  # each layer's long steps teach the layers after it
    for name, module in model.named_modules():
        if not isinstance(module, MoE) or not isinstance(module.experts, CpuExperts):
            continue
        why_not = DualExperts.supports(module.experts)
        if why_not:
            kept.setdefault(why_not, []).append(name)
            continue
        c = module.cfg
        module.experts = DualExperts(module.experts, c.num_experts, c.hidden_size, c.intermediate_size,
                                     buffer_bytes=buffer_bytes, shared=shared)
        if last is not None:
            last.next_layer = module.experts  # layers run in module order (TANDEM_DUAL_PRESTAGE)
        last = module.experts
        wrapped += 1
        if register:
            t0 = time.perf_counter()
            locked += module.experts.register_slabs()
            seconds += time.perf_counter() - t0
    for why_not, names in kept.items():
        log.warning("%d MoE layer(s) keep prefill on the CPU engine alone (%s): %s", len(names), why_not, names[0])
    if locked:
        log.info("page-locked %.1f GB of expert weights for dual-path prefill in %.1f s", locked / 1e9, seconds)
    return wrapped

