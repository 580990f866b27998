"""Budgets and the refusal: does a MemoryPlan fit, and if not, which flag to change.

Budgets are the free VRAM of the --device (torch.cuda.mem_get_info, measured after CUDA starts)
and the RAM the kernel says is available (/proc/meminfo MemAvailable: free memory plus caches it
can drop, e.g. pages of an mmapped model file), unless --vram-budget / --ram-budget give them.
Probing happens only when asked (never at import).
"""

import logging
from pathlib import Path

from tandem.errors import TandemError
from tandem.placement.memory import GB, ROUTED, MemoryPlan, gb

log = logging.getLogger(__name__)


def free_vram(device: str) -> int | None:
    """Free bytes on a CUDA device, or None when there is no CUDA device to ask."""
    import torch

    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        raise TandemError(f"--device {device} needs a CUDA GPU, and torch sees none; pass --device cpu")
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def available_ram(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes, or None where the kernel does not say (not Linux)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    log.warning("cannot read MemAvailable from %s; the RAM budget is not checked (pass --ram-budget GB)", meminfo)
    return None


def budgets(device: str, vram_gb: float | None, ram_gb: float | None) -> tuple[int | None, int | None, tuple[str, str]]:
    """(VRAM bytes, RAM bytes, how each was found): the flags when given, else measured."""
    for flag, value in (("--vram-budget", vram_gb), ("--ram-budget", ram_gb)):
        if value is not None and not value > 0:
            raise TandemError(f"{flag} must be a positive number of GB, got {value}")
    vram = int(vram_gb * GB) if vram_gb is not None else free_vram(device)
    ram = int(ram_gb * GB) if ram_gb is not None else available_ram()
    sources = ("given by --vram-budget" if vram_gb is not None else "free",
               "given by --ram-budget" if ram_gb is not None else "available")
    return vram, ram, sources


class DoesNotFit(TandemError):
    """The plan exceeds a budget; the message (one line) says which flag to change."""

    def __init__(self, message: str, plan: MemoryPlan):
        super().__init__(message)
        self.plan = plan  # for front ends that show the table beside the error


def check_fits(plan: MemoryPlan) -> None:
    """Raise DoesNotFit (a TandemError) with advice when the plan exceeds a budget."""
    problems = []
    if plan.vram_budget is not None and plan.vram > plan.vram_budget:
        problems.append(f"needs {gb(plan.vram)} GB of VRAM but {gb(plan.vram_budget)} GB is {plan.budget_sources[0]}: "
                        + "; ".join(_vram_advice(plan)))
    if plan.ram_budget is not None and plan.ram_peak > plan.ram_budget:
        problems.append(f"needs {gb(plan.ram_peak)} GB of RAM but {gb(plan.ram_budget)} GB is {plan.budget_sources[1]}: "
                        + "; ".join(_ram_advice(plan)))
    if problems:
        raise DoesNotFit("the model does not fit: it " + " — and it ".join(problems), plan)


def _kv_advice(plan: MemoryPlan, over: int) -> list[str]:
    kv = plan.kv
    if not kv.bytes:
        return []
    per_context = kv.bytes_per_token * kv.max_batch
    room = kv.bytes - over  # what the cache may take for the rest to fit
    fits = room // per_context if per_context else 0
    tips = []
    if fits >= 2:
        tips.append(f"lower --max-context to {min(fits, kv.max_context - 1)} or less "
                    f"(the KV cache takes {gb(kv.bytes)} GB for {kv.max_batch} x {kv.max_context} tokens)")
    if kv.max_batch > 1:
        tips.append(f"lower --max-batch (each sequence's cache takes {gb(kv.bytes // kv.max_batch)} GB)")
    return tips


def _vram_advice(plan: MemoryPlan) -> list[str]:
    over = plan.vram - plan.vram_budget
    tips = []
    gpu_experts = [r for r in plan.rows if r.group == ROUTED and r.on_gpu]
    if gpu_experts:
        layers = len(set().union(*(r.layers for r in gpu_experts)))
        per_layer = max(r.bytes // max(len(r.layers), 1) for r in gpu_experts)
        need = -(-over // per_layer)
        if need < layers:
            tips.append(f"raise --n-cpu-moe-layers by {need} or more (routed experts take {gb(per_layer)} GB per layer on the GPU)")
        else:
            tips.append(f"keep every layer's routed experts in CPU RAM (--cpu-moe): the {layers} on the GPU take "
                        f"{gb(sum(r.bytes for r in gpu_experts))} GB there")
    tips += _kv_advice(plan, over)
    weights = plan.weights(True) - sum(r.bytes for r in gpu_experts)
    if weights > plan.vram_budget:
        dtype = {r.format for r in plan.rows if r.on_gpu and r.backend == "torch" and r.group != "routers"}
        tip = f"the non-expert weights alone take {gb(weights)} GB as {'/'.join(sorted(dtype))}"
        stored = sum(r.stored_bytes for r in plan.rows if r.on_gpu and r.group != ROUTED)
        if 0 < stored < weights:
            tip += f" (the file stores them in {gb(stored)} GB: a GGUF quant keeps them in blocks on the GPU)"
        if "fp32" in dtype:
            tip += "; --dtype bfloat16 halves them"
        tips.append(tip + ": run on the CPU with --device cpu, or use a GPU with more memory")
    elif not tips:
        longest = plan.longest_prompt()
        tips.append(f"the step workspace ({gb(plan.workspace)} GB) does not fit; lower --max-step-tokens or "
                    f"--max-context (prefill chunks fit up to ~{longest} tokens of context)")
    return tips


def _ram_advice(plan: MemoryPlan) -> list[str]:
    over = plan.ram_peak - plan.ram_budget
    tips = []
    engine = [r for r in plan.rows if r.backend in ("engine", "blocks") and not r.on_gpu]
    quantized = [r for r in engine if r.format not in ("bf16", "int8", "int4")]
    floats = [r for r in engine if r.format in ("bf16", "int8", "int4")]
    if quantized:
        tips.append(f"use a smaller quant of the model (its routed experts take {gb(sum(r.bytes for r in quantized))} GB)")
    if floats and plan.experts_format != "int4":
        smaller = "int8 or int4" if plan.experts_format == "bf16" else "int4"
        tips.append(f"--experts-format {smaller} (routed experts take {gb(sum(r.bytes for r in floats))} GB "
                    f"as {plan.experts_format})")
    if plan.float_experts_torch:
        tips.append(f"loading holds the float experts at the model dtype ({gb(plan.float_experts_torch)} GB) before "
                    "the engine repacks them: a GGUF or pre-quantized file avoids that peak")
    per_layer = max((r.bytes // max(len(r.layers), 1) for r in engine), default=0)
    if per_layer and plan.vram_budget is not None and plan.on_gpu:
        spare = plan.vram_budget - plan.vram
        gpu_layer = _gpu_layer_bytes(plan)
        if gpu_layer and spare >= gpu_layer:
            tips.append(f"--n-cpu-moe-layers to move up to {spare // gpu_layer} MoE layers' experts to the GPU "
                        f"({gb(gpu_layer)} GB each there)")
    if not plan.on_gpu:
        tips += _kv_advice(plan, over)
        dense = sum(r.bytes for r in plan.rows if r.group != ROUTED)
        tips.append(f"a GPU (--device cuda) takes the non-expert weights ({gb(dense)} GB) and the KV cache off the RAM")
    return tips or [f"free {gb(over)} GB of RAM or use a machine with more"]


def _gpu_layer_bytes(plan: MemoryPlan) -> int:
    """What one MoE layer's routed experts would take on the GPU: dequantized to the model dtype."""
    engine = [r for r in plan.rows if r.group == ROUTED and not r.on_gpu and r.layers]
    return max((r.numel // len(r.layers) * plan.step.act_bytes for r in engine), default=0)
