"""The memory planner: VRAM and RAM per module group, from the model file's headers, before loading.

Input: one `ParamInfo` per model parameter (name, group, shape, dtype as the model holds it, and
how the file stores it), the resolved Placement, the KV cache's shape and the step shape. Each
parameter costs what its target holds:
  routed experts in the CPU engine   quantized GGUF blocks as stored; float experts in the
                                     --experts-format (bf16 2 B, int8 1 B + a 4 B scale per row,
                                     int4 36 B per 64 weights), as csrc/quant declares them
  quantized experts, torch on CPU    the file's blocks (BlockExperts, dequantized per call)
  hot experts (--gpu-experts)        N experts per layer on the --device, beside the engine's
                                     full set: on a GPU the file's blocks where all of a layer's
                                     expert formats are GPU_BLOCK_FORMATS (hot_blocks_format),
                                     else at the model dtype
  quantized weights on a GPU         the file's blocks where the GPU kernels read the format
                                     (GPU_BLOCK_FORMATS: QuantLinear / QuantEmbedding)
  everything else                    numel x the model dtype (routers fp32): other GGUF weights
                                     (and tensors a model derives from several, e.g. DeepSeek's
                                     kv_b) are dequantized as they load
plus the KV cache (sum of the layers' cache row widths x tokens x dtype bytes), a workspace
estimate for one step, the CPU engine's buffers for one step (engine_staging_bytes) and, on a GPU
with dual-path prefill, its buffer and a long step's sums (dual_buffer, dual_step). RAM is also planned at its load-time peak (float experts are held at the
model dtype before the engine repacks them, and one tensor at a time is read as float32). The
process itself (torch, CUDA context) is not counted: budgets are measured after it started.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tandem.errors import TandemError
from tandem.ops.split_rows import SPLIT_FORMATS, split_bytes
from tandem.placement.rules import Placement, Target

GB = 10**9  # the plan and the --*-budget flags count decimal gigabytes
ROUTED = "routed experts"
GROUPS = ("embeddings", "attention", "dense FFN", "shared experts", "routers", ROUTED, "output head", "other")
# What float-stored routed experts become in the CPU engine: (weights per block, bytes per block,
# bytes of row header), as csrc/quant/{bf16,int8,int4}.h declare them (a test checks they agree).
ENGINE_FLOAT_FORMATS = {"bf16": (1, 2, 0), "int8": (1, 1, 4), "int4": (64, 36, 0)}
DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
# Block formats the GPU's fused dequant-matmul kernels read (tandem/ops/triton/quant.py).
GPU_BLOCK_FORMATS = frozenset({"Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"})
# Hot experts whose three projections are all in these formats are held as split rows (the file's
# bytes regrouped, each row padded to 16 bytes: tandem/ops/split_rows.py) for ops/triton/moe_q8.py.
GPU_SPLIT_FORMATS = frozenset(SPLIT_FORMATS)
PREFILL_TOKENS = 512  # default tokens per step (--max-step-tokens): longer prompts prefill in chunks
SLACK = 32 * 2**20  # cuBLAS workspace, allocator rounding, small temporaries
# GPU prefill steps of at least DEQUANT_MIN_TOKENS tokens decode each block-format linear's weights
# into the activations' dtype, at most DEQUANT_CHUNK_BYTES at a time, and multiply with cuBLAS
# (tandem/ops/triton/quant.py's "dequant" path; tests hold these to its constants).
DEQUANT_MIN_TOKENS = 512
DEQUANT_CHUNK_BYTES = 32 << 20
# Engine formats the GPU reads in the engine's layout for the dual-path prefill (the formats of
# tandem.ops.triton.tiled, which tests hold this to); layers in other formats prefill on the engine.
DUAL_FORMATS = frozenset({"Q8_0", "Q5_0", "Q4_K", "Q6_K", "BF16", "INT8", "INT4"})


@dataclass(frozen=True)
class ParamInfo:
    """One model parameter as the runtime hands it over (this package never sees the model)."""

    name: str  # tandem's name, e.g. "layers.3.ffn.experts.w_gate"
    group: str  # one of GROUPS
    shape: tuple[int, ...]
    dtype: str  # as the model holds it: "bfloat16", "float32", ...
    dtype_bytes: int
    layer: int | None = None  # decoder layer index, None outside the layers
    stored: str = ""  # the file's format(s), "+"-joined: "Q4_K", "bfloat16", "" when not in the file
    stored_bytes: int = 0
    blocks: bool = False  # stored as quantized blocks a backend may keep as they are (not derived, not tied)
    stored_pieces: int = 1  # file tensors that fill it (HF: one per expert), read one at a time

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"unknown module group {self.group!r}; one of {GROUPS}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class StepShape:
    """What the workspace estimate needs of a model: numbers, not modules."""

    hidden: int
    vocab: int
    heads: int  # attention heads of the widest layer
    widest: int  # the widest activation row (largest linear output on the device)
    act_bytes: int  # bytes per activation element (the model dtype)
    kv_expand: int = 0  # bytes a prefill step materializes per context token (gathered cache rows;
    # MLA: keys and values expanded from the latent)
    kv_chunk: int = 0  # a prefill step attends at most this many context tokens at a time (0: all)
    chunk_state: int = 0  # bytes per new token of one chunk's partial output and log-sum-exp
    engine_per_token: int = 0  # CPU RAM the engine's buffers take per token of a step (engine_staging_bytes)
    widest_weight: int = 0  # elements of the largest linear weight outside the experts (its dequantized chunk)


def workspace_bytes(
    s: StepShape, tokens: int, context: int, logits_rows: int, attention: str = "reference", prefill: bool = True
) -> int:
    """Activations of one step of `tokens` new tokens attending over `context` tokens (one sequence
    at a time). attention: "reference" (plain torch: fp32 scores [heads, tokens, context] and their
    masked and softmaxed copies, plus the expanded context), "fused" (torch's SDPA on a GPU: the
    expanded context only) or "kernel" (paged decode kernels: nothing per context token). A context
    longer than s.kv_chunk is attended by a `prefill` step that many tokens at a time, each chunk's
    partial output merged into a running one (MLA: layers/attention.py), so only one chunk counts
    (decode steps attend all of it at once). The rest is
    a few live [tokens, widest] and [tokens, hidden] rows (an MLP's gate, up and product; the
    residual stream), the fp32 logits and, for a GPU prefill step of >= DEQUANT_MIN_TOKENS tokens,
    one linear's dequantized weights (at most DEQUANT_CHUNK_BYTES). Checked against measured peaks
    (tests/placement/test_hybrid_gpu.py, `tandem bench`'s allocated-vs-plan row)."""
    chunked = prefill and 0 < s.kv_chunk < context and attention != "kernel"
    if chunked:  # one chunk of the context at a time; the running output, a chunk's and their merge
        context = s.kv_chunk
    scores = 3 * s.heads * tokens * context * 4 if attention == "reference" else 0
    expand = context * s.kv_expand if attention != "kernel" else 0
    merge = 3 * tokens * s.chunk_state if chunked else 0
    rows = tokens * (3 * s.widest + 6 * s.hidden) * s.act_bytes
    logits = 2 * logits_rows * s.vocab * 4
    dequant = min(DEQUANT_CHUNK_BYTES, s.widest_weight * s.act_bytes) if prefill and attention == "fused" \
        and tokens >= DEQUANT_MIN_TOKENS else 0
    return scores + expand + merge + rows + logits + dequant + SLACK


def engine_staging_bytes(hidden: int, inter: int, top_k: int) -> int:
    """CPU RAM the engine's buffers hold per token of a step (csrc/moe.cpp; they only grow, so the
    longest step sets them): the input's copy and the summed output (fp32 rows of `hidden`), and
    per (token, expert) pair its activation rows for gate/up and down (bf16 or smaller on the
    AVX-512/AMX kernels), h (fp32 rows of `inter`) and, in prefill jobs, down's output (fp32 rows
    of `hidden`) before each token sums its experts'. Per NUMA node the engine runs on: the plan
    counts one (a two-node engine holds the per-pair rows twice)."""
    return 8 * hidden + top_k * (6 * hidden + 6 * inter)


def engine_float_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes of a float [..., K] experts tensor once the CPU engine holds it in `fmt`."""
    per_block, block_bytes, header = ENGINE_FLOAT_FORMATS[fmt]
    rows, k = math.prod(shape[:-1]), shape[-1]
    return rows * (-(-k // per_block) * block_bytes + header)


def hot_blocks_format(routed: Sequence[ParamInfo], gpu: bool) -> str | None:
    """The format mix ("Q4_K+Q6_K") in which hot experts of a layer whose routed parameters are
    `routed` stay on the device: its file's blocks on a GPU when every one is blocks the GPU
    kernels decode (runtime/hot_experts.py chooses the same way); None: float copies."""
    if not gpu or not routed or not all(p.blocks and p.stored in GPU_BLOCK_FORMATS for p in routed):
        return None
    return "+".join(sorted({p.stored for p in routed}))


def hot_bytes_per_expert(p: ParamInfo, blocks: str | None) -> int:
    """VRAM of one expert of routed parameter p as a hot copy: float (blocks None), the file's
    blocks, or split rows (every format of the mix in GPU_SPLIT_FORMATS: rows padded to 16 bytes)."""
    if not blocks:
        return p.numel // p.shape[0] * p.dtype_bytes
    if not set(blocks.split("+")) <= GPU_SPLIT_FORMATS:
        return p.stored_bytes // p.shape[0]
    return math.prod(p.shape[1:-1]) * split_bytes(p.stored, p.shape[-1])


def held(p: ParamInfo, target: Target, experts_format: str) -> tuple[int, str, str]:
    """(bytes, backend, format) of parameter p where `target` holds it."""
    if p.group == ROUTED and target.backend == "engine":
        if p.blocks:
            return p.stored_bytes, "engine", p.stored
        return engine_float_bytes(p.shape, experts_format), "engine", experts_format
    if p.group == ROUTED and p.blocks and not target.on_gpu:
        return p.stored_bytes, "blocks", p.stored  # BlockExperts: the file's blocks, dequantized per call
    if p.group != ROUTED and p.blocks and target.on_gpu and p.stored in GPU_BLOCK_FORMATS:
        return p.stored_bytes, "blocks", p.stored  # dequantized inside the GPU matmul
    return p.numel * p.dtype_bytes, "torch", DTYPE_NAMES.get(p.dtype, p.dtype)


@dataclass
class PlanRow:
    """Parameters of one group that share device, backend and format."""

    group: str
    device: str  # "cuda", "cpu"
    backend: str  # "torch", "engine", "blocks"
    format: str  # as held: "bf16", "fp32", "Q4_K+Q6_K", "int8"
    tensors: int = 0
    numel: int = 0
    bytes: int = 0
    stored_bytes: int = 0
    stored: set = field(default_factory=set)
    layers: set = field(default_factory=set)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class KVPlan:
    tokens: int  # rows the cache holds: max_batch x max_context rounded up to blocks
    bytes_per_token: int  # all layers together
    device: str
    max_context: int
    max_batch: int

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token


@dataclass(frozen=True)
class MemoryPlan:
    rows: tuple[PlanRow, ...]
    device: str  # the --device: KV cache and workspace live here
    kv: KVPlan
    workspace: int  # one step's activations on the --device
    step_tokens: int
    hot_expert_bytes: int  # one expert of every engine layer as a hot copy holds it (a --gpu-experts step)
    step: StepShape
    experts_format: str
    load_transient: int  # RAM: the largest tensor read as float32 while streaming
    float_experts_torch: int  # RAM: float experts bound for the engine, as torch holds them before the repack
    largest_engine_layer: int  # RAM: one layer of those experts in the engine, while the repack runs
    vram_budget: int | None = None  # bytes; None: not checked
    ram_budget: int | None = None
    budget_sources: tuple[str, str] = ("", "")  # how each budget was found, for the table
    # Dual-path prefill (layers/dual_experts.py): the device bytes of one expert of the largest
    # engine layer as the device takes it (its stored blocks twice: one run's and the next run's
    # copies; its weights decoded into the model dtype), and the buffer the device's share of a
    # long step may use (0: no dual path).
    dual_expert_bytes: int = 0
    dual_layer_bytes: int = 0  # all experts of the largest such layer (more buffer than this is never used)
    dual_buffer: int = 0
    # ... and, beside the buffer, what a long step's device share holds whatever its runs: the
    # padded input, each run's part and the running total in the model dtype, the fp32 sum.
    dual_step: int = 0
    engine_workspace: int = 0  # CPU RAM of the engine's buffers at the longest step (0: no engine layers)

    def weights(self, gpu: bool) -> int:
        return sum(r.bytes for r in self.rows if r.on_gpu == gpu)

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def vram(self) -> int:
        return self.weights(True) + (self.kv.bytes + self.workspace + self.dual_buffer + self.dual_step
                                     if self.on_gpu else 0)

    @property
    def ram(self) -> int:
        """RAM once loaded."""
        return self.weights(False) + self.engine_workspace + (0 if self.on_gpu else self.kv.bytes + self.workspace)

    @property
    def ram_peak(self) -> int:
        """RAM while loading: float experts wait at the model dtype until the engine repacks them."""
        engine_float = sum(r.bytes for r in self.rows if r.backend == "engine" and r.format in ENGINE_FLOAT_FORMATS)
        waiting = self.float_experts_torch - engine_float + self.largest_engine_layer if engine_float else 0
        return self.ram + max(waiting, 0) + self.load_transient

    def hot_experts_that_fit(self) -> int:
        """Experts per layer a --vram-budget leaves room for (0 without a budget or a GPU)."""
        if not self.on_gpu or self.vram_budget is None or not self.hot_expert_bytes:
            return 0
        return max(0, (self.vram_budget - self.vram) // self.hot_expert_bytes)

    @property
    def attention(self) -> str:
        return "fused" if self.on_gpu else "reference"

    def longest_prompt(self) -> int:
        """The longest context whose prefill chunks fit the --device's budget (max_context if all do)."""
        budget = self.vram_budget if self.on_gpu else self.ram_budget
        if budget is None:
            return self.kv.max_context
        fixed = (self.vram if self.on_gpu else self.ram_peak) - self.workspace

        def fits(t: int) -> bool:
            return fixed + workspace_bytes(self.step, min(t, self.step_tokens), t, 1, self.attention) <= budget

        lo, hi = 0, self.kv.max_context
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo


def plan_memory(
    params: Sequence[ParamInfo],
    placement: Placement,
    *,
    kv_bytes_per_token: int,
    max_context: int,
    max_batch: int,
    block_size: int,
    step: StepShape,
    experts_format: str = "bf16",
    step_tokens: int = PREFILL_TOKENS,
    hot_experts: int = 0,
    vram_budget: int | None = None,
    ram_budget: int | None = None,
    budget_sources: tuple[str, str] = ("", ""),
    dual_buffer: int = 0,
) -> MemoryPlan:
    """Resolve every parameter's target and add up what each device holds. dual_buffer: device
    bytes for the dual-path prefill (at least one expert's dual_expert_bytes; 0: none)."""
    if experts_format not in ENGINE_FLOAT_FORMATS:
        raise TandemError(f"unknown experts format {experts_format!r}; choose one of {', '.join(ENGINE_FLOAT_FORMATS)}")
    resolved = []
    mixes: dict[tuple, set] = {}  # (layer, device, backend) -> formats of that layer's routed experts
    routed_of: dict[int, list[ParamInfo]] = {}  # layer -> its routed parameters
    for p in params:
        target = placement.resolve(p.name, p.group == ROUTED)
        nbytes, backend, fmt = held(p, target, experts_format)
        resolved.append((p, target, nbytes, backend, fmt))
        if p.group == ROUTED:
            mixes.setdefault((p.layer, target.device, backend), set()).add(fmt)
            routed_of.setdefault(p.layer, []).append(p)
    hot_formats = {layer: hot_blocks_format(ps, placement.device != "cpu") for layer, ps in routed_of.items()}
    rows: dict[tuple, PlanRow] = {}
    float_torch, layer_engine, largest_read, one_expert = 0, {}, 0, 0
    dual: dict = {}  # layer -> [stored bytes, weights, device-readable, experts] of one engine expert
    for p, target, nbytes, backend, fmt in resolved:
        if p.group == ROUTED and backend == "engine":
            per = dual.setdefault(p.layer, [0, 0, True, p.shape[0]])
            per[0] += nbytes // p.shape[0]
            per[1] += p.numel // p.shape[0]
            per[2] = per[2] and fmt.upper() in DUAL_FORMATS
            # Hot experts (--gpu-experts): a copy of N experts per layer on the --device (blocks
            # or float), beside the engine's full set.
            blocks = hot_formats.get(p.layer)
            per_expert = hot_bytes_per_expert(p, blocks)
            one_expert += per_expert
            n = min(hot_experts, p.shape[0])
            if n:
                name = f"{blocks or DTYPE_NAMES.get(p.dtype, p.dtype)} x {n} hot"
                hot = rows.setdefault((p.group, placement.device, "torch", name),
                                      PlanRow(p.group, placement.device, "torch", name))
                hot.tensors += 1
                hot.numel += p.numel // p.shape[0] * n
                hot.bytes += per_expert * n
                hot.layers.add(p.layer)
        if not (p.blocks and backend in ("engine", "blocks")):  # streamed through load_state as float32
            largest_read = max(largest_read, p.numel // p.stored_pieces)
        if p.group == ROUTED:  # one row per mix of formats (a Q4_K_M layer: Q4_K gate/up, Q6_K down)
            fmt = "+".join(sorted(mixes[(p.layer, target.device, backend)]))
        row = rows.setdefault((p.group, target.device, backend, fmt), PlanRow(p.group, target.device, backend, fmt))
        row.tensors += 1
        row.numel += p.numel
        row.bytes += nbytes
        row.stored_bytes += p.stored_bytes
        row.stored.update(s for s in p.stored.split("+") if s)
        if p.layer is not None:
            row.layers.add(p.layer)
        if backend == "engine" and not p.blocks:
            float_torch += p.numel * p.dtype_bytes
            layer_engine[p.layer] = layer_engine.get(p.layer, 0) + nbytes
    order = {g: i for i, g in enumerate(GROUPS)}
    ordered = sorted(rows.values(), key=lambda r: (order[r.group], not r.on_gpu, r.backend, r.format))
    # Cache rows: every sequence may grow to max_context, as the Engine sizes its paged cache.
    kv_tokens = max_batch * -(-max_context // block_size) * block_size
    # A prompt chunk of step_tokens attends to everything cached before it (up to max_context);
    # a decode step of max_batch tokens reads the cache through the kernels on a GPU.
    gpu = placement.device != "cpu"
    prefill = workspace_bytes(step, min(max_context, step_tokens), max_context, max_batch, "fused" if gpu else "reference")
    decode = workspace_bytes(step, max_batch, max_context, max_batch, "kernel" if gpu else "reference", prefill=False)
    engine = any(r.backend == "engine" for r in ordered)
    return MemoryPlan(
        engine_workspace=step.engine_per_token * max(min(max_context, step_tokens), max_batch) if engine else 0,
        rows=tuple(ordered),
        device=placement.device,
        kv=KVPlan(kv_tokens, kv_bytes_per_token, placement.device, max_context, max_batch),
        workspace=max(prefill, decode),
        step_tokens=step_tokens,
        hot_expert_bytes=one_expert,
        step=step,
        experts_format=experts_format,
        load_transient=4 * largest_read,
        float_experts_torch=float_torch,
        largest_engine_layer=max(layer_engine.values(), default=0),
        vram_budget=vram_budget,
        ram_budget=ram_budget,
        budget_sources=budget_sources,
        dual_expert_bytes=max((2 * b + n * step.act_bytes for b, n, ok, _ in dual.values() if ok), default=0)
        if gpu else 0,
        dual_layer_bytes=max(((2 * b + n * step.act_bytes) * e for b, n, ok, e in dual.values() if ok),
                             default=0) if gpu else 0,
        dual_buffer=dual_buffer if gpu else 0,
        dual_step=min(max_context, step_tokens) * step.hidden * (4 + 3 * step.act_bytes) if gpu and dual_buffer else 0,
    )


def gb(n: int) -> str:
    return f"{n / GB:.2f}"


def size(n: int) -> str:
    """Bytes for the table: GB, or MB / kB where GB would print as zero."""
    unit, scale = next(((u, s) for u, s in (("GB", GB), ("MB", 10**6)) if n >= s / 10), ("kB", 10**3))
    return f"{n / scale:.2f} {unit}"


def _layers(layers: set) -> str:
    """{3, 4, 5, 9} -> '3-5,9'; long lists of runs shrink to 'count in first-last'."""
    if not layers:
        return "-"
    ordered = sorted(layers)
    runs, start = [], ordered[0]
    for prev, cur in zip(ordered, ordered[1:] + [None]):
        if cur is None or cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ",".join(runs) if len(runs) <= 3 else f"{len(ordered)} in {ordered[0]}-{ordered[-1]}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table: one line per group x device x backend x format, then the totals."""
    head = ("module group", "device", "backend", "format", "layers", "tensors", "size", "file format", "file size")
    lines = [
        (r.group, "cpu" if r.backend == "engine" else r.device, r.backend, r.format, _layers(r.layers),
         str(r.tensors), size(r.bytes), "+".join(sorted(r.stored)) or "-", size(r.stored_bytes))
        for r in plan.rows
    ]
    kv = plan.kv
    lines.append(("KV cache", kv.device, "torch", f"{kv.max_batch} x {kv.max_context} tok", "-",
                  "-", size(kv.bytes), "-", "-"))
    chunks = f", context by {plan.step.kv_chunk}" if 0 < plan.step.kv_chunk < kv.max_context else ""
    lines.append(("workspace (estimate)", plan.device, "torch", f"step <= {plan.step_tokens} tok{chunks}", "-", "-",
                  size(plan.workspace), "-", "-"))
    if plan.engine_workspace:
        lines.append(("engine workspace (estimate)", "cpu", "engine", f"step <= {plan.step_tokens} tok", "-", "-",
                      size(plan.engine_workspace), "-", "-"))
    if plan.dual_buffer:
        lines.append(("dual-path prefill", plan.device, "torch", "experts copied, step sums", "-", "-",
                      size(plan.dual_buffer + plan.dual_step), "-", "-"))
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    numeric = {5, 6, 8}

    def fmt(row) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines]
    vram_src, ram_src = plan.budget_sources

    def total(name: str, need: int, budget: int | None, source: str) -> str:
        of = f" of {gb(budget)} GB {source}".rstrip() if budget is not None else " (budget not checked)"
        return f"{name:<5} {gb(need)} GB{of}"

    if plan.on_gpu or plan.weights(True):
        out.append(total("VRAM", plan.vram, plan.vram_budget, vram_src))
    out.append(total("RAM", plan.ram, plan.ram_budget, ram_src) + f"; {gb(plan.ram_peak)} GB at the load's peak")
    dequantized = _dequantized(plan.rows)
    if dequantized:
        held_b, file_b = sum(r.bytes for r in dequantized), sum(r.stored_bytes for r in dequantized)
        out.append(
            f"note: {gb(held_b)} GB of GPU weights are dequantized from {gb(file_b)} GB of quantized blocks "
            f"(tensors derived from several, or formats without a GPU kernel)"
        )
    longest = plan.longest_prompt()
    if 0 < longest < kv.max_context:
        full = workspace_bytes(plan.step, min(kv.max_context, plan.step_tokens), kv.max_context, 1, plan.attention)
        out.append(
            f"note: contexts longer than ~{longest} tokens do not fit: a prefill chunk of {plan.step_tokens} tokens "
            f"at {kv.max_context} takes {gb(full)} GB of activations (lower --max-step-tokens)"
        )
    return "\n".join(out)


def _dequantized(rows: Sequence[PlanRow]) -> list[PlanRow]:
    """GPU rows held in the model dtype though the file stores them as quantized blocks."""
    return [
        r for r in rows
        if r.on_gpu and r.backend == "torch" and 0 < r.stored_bytes < r.bytes
        and any(re.fullmatch(r"I?Q\d.*|TQ.*", s) for s in r.stored)
    ]
