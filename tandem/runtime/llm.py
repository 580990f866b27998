"""The Python API: `LLM(path).generate(...)` and `.stream(...)` over the one Engine.

`path` is an HF model directory or a GGUF model (.gguf file, a part of a split one, or a folder
of parts); `config_dir` gives a GGUF model its HF config.json and tokenizer instead of its metadata.

A prompt is raw text (tokenized with the model's BOS handling), a chat as a list of
{"role", "content"} messages (rendered with the model's chat template), or token ids.
`generate(..., logprobs=N)` also returns each generated token's log-probability and the N most
likely alternatives (`Generation.logprobs`; runtime/logprobs.py says which distribution).
"""

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.errors import TandemError
from tandem.layers.attention import PREFILL_KV_CHUNK, MLAttention
from tandem.placement.advice import DoesNotFit, budgets, check_fits
from tandem.placement.memory import format_plan
from tandem.placement.rules import PlacementOptions, build_placement
from tandem.runtime.engine import Engine
from tandem.runtime.experts import DUAL_BUFFER_BYTES, create_cpu_engine, enable_dual_prefill
from tandem.runtime.hot_experts import (
    calibration_tokens,
    moved_hot_experts,
    place_hot_experts,
    replace_hot_experts,
    routing_counts,
)
from tandem.runtime.loader import (
    checkpoint_view,
    load_model,
    meta_model,
    open_model_files,
    resolve_dtype,
)
from tandem.runtime.logprobs import TokenLogprobs
from tandem.runtime.plan import (
    bind_cpu_engine,
    experts_modules,
    experts_targets,
    plan_model,
    stored_tensors,
)
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.tokenizer import check_prompt_chars

Prompt = str | list[dict] | list[int]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None = None
    prefill_seconds: float = 0.0  # time to first token
    decode_seconds: float = 0.0
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry when asked (logprobs=N)

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_token_ids) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes out of the prefill step
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


@dataclass
class GenerationStream:
    """Iterates over text pieces as they are generated; `result` is complete once exhausted."""

    _pieces: Iterator[str]
    result: Generation = field(default=None)

    def __iter__(self) -> Iterator[str]:
        return self._pieces


def _blocking_sync(index: int) -> None:
    """Waiting for the GPU sleeps instead of spinning: the CPU experts' threads need the cores."""
    from tandem.ops.cuda_host import use_blocking_sync

    try:
        if not use_blocking_sync(index):
            print("note: the CUDA driver kept spin-waiting (its context already existed)", file=sys.stderr)
    except (OSError, RuntimeError, AttributeError) as e:
        print(f"note: could not set blocking sync on the GPU: {e}", file=sys.stderr)


# --max-step-tokens auto: the largest whose step workspace fits. A long step pays each layer's
# expert copies to the GPU (dual-path prefill) once for all its tokens: an 8K prompt in one
# step prefilled 2.3x faster than in 2K steps would (V2-Lite, H100 box, session 23: 0.83 s
# against >= 4 x 0.48 s, the time of a 2K prompt alone).
STEP_TOKEN_CHOICES = (8192, 4096, 2048, 1024, 512)
# prefill_kv_chunk auto: the largest whose workspace fits (MLA prefill expands this many context tokens at a time)
KV_CHUNK_CHOICES = (PREFILL_KV_CHUNK, 4096, 2048, 1024)


def _fits(plan) -> bool:
    try:
        check_fits(plan)
    except DoesNotFit:
        return False
    return True


def _step_tokens(value: int | str, max_context: int, fits) -> int:
    """--max-step-tokens: a count >= 1, or "auto": the largest of STEP_TOKEN_CHOICES (at most the
    context) whose plan fits the memory budgets (the smallest when none does: the plan's check then
    refuses with advice). Longer chunks prefill faster (more tokens per expert for the CPU engine's
    matrix units); a chunk also delays the decode steps of other running sequences."""
    if value == "auto":
        choices = [s for s in STEP_TOKEN_CHOICES if s <= max_context] or [min(STEP_TOKEN_CHOICES)]
        return next((s for s in choices if fits(s)), choices[-1])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TandemError(f"--max-step-tokens must be a count >= 1 or 'auto', got {value!r}")
    return value


def dual_buffer_bytes() -> int:
    """The dual path's copy buffer a plan asks for: runtime.experts.DUAL_BUFFER_BYTES, or
    TANDEM_DUAL_BUFFER_MB MiB (to measure bigger runs: fewer of them a layer, each with its host
    work; the plan still has to fit the VRAM budget)."""
    raw = os.environ.get("TANDEM_DUAL_BUFFER_MB", "").strip()
    if not raw:
        return DUAL_BUFFER_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise TandemError(f"TANDEM_DUAL_BUFFER_MB must be a whole number of MiB >= 1, got {raw!r}")
    return int(raw) << 20


def _dual_want(plan, dual_prefill: bool, experts: str) -> int:
    """Device bytes the dual-path prefill's copy buffer asks for under `plan` (0: no dual path):
    dual_buffer_bytes(), at most a whole layer's experts, at least one expert's."""
    if not (dual_prefill and plan.dual_expert_bytes and experts == "cpu"):
        return 0
    return max(min(dual_buffer_bytes(), plan.dual_layer_bytes), plan.dual_expert_bytes)


def _choose_chunks(max_step_tokens: int | str, kv_chunks: tuple[int, ...], max_context: int, plan,
                   dual: int) -> tuple[int, int]:
    """(tokens a step, MLA prefill's context chunk of `kv_chunks`, _kv_chunks' choices) by
    _step_tokens, each fitting beside `dual` bytes of the dual path's buffer: a long step that left
    the buffer no room would send every prefill back to the CPU engine alone.
    plan(hot, step, kv_chunk, dual) -> MemoryPlan."""
    step = _step_tokens(max_step_tokens, max_context, lambda s: any(_fits(plan(0, s, c, dual)) for c in kv_chunks))
    return step, next((c for c in kv_chunks if _fits(plan(0, step, c, dual))), kv_chunks[-1])


def _kv_chunks(value: int | str) -> tuple[int, ...]:
    """prefill_kv_chunk: a count >= 1, or "auto": KV_CHUNK_CHOICES, tried largest first."""
    if value == "auto":
        return KV_CHUNK_CHOICES
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TandemError(f"prefill_kv_chunk must be a count >= 1 or 'auto', got {value!r}")
    return (value,)


def _hot_count(gpu_experts: int | str, plan) -> int:
    """--gpu-experts as a count per layer: an int >= 0, or "auto" (what the VRAM budget leaves room for)."""
    if gpu_experts == "auto":
        return plan.hot_experts_that_fit()
    if isinstance(gpu_experts, bool) or not isinstance(gpu_experts, int) or gpu_experts < 0:
        raise TandemError(f"--gpu-experts must be a count >= 0 or 'auto', got {gpu_experts!r}")
    return gpu_experts


class LLM:
    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_context: int | None = None,
        max_batch: int = 8,
        max_step_tokens: int | str = "auto",
        progress: bool = True,
        config_dir: str | Path | None = None,
        experts: str = "cpu",
        experts_format: str = "bf16",
        cpu_threads: int | None = None,
        cpu_moe: bool = False,
        n_cpu_moe_layers: int | None = None,
        placement: str | Path | None = None,
        vram_budget: float | None = None,
        ram_budget: float | None = None,
        show_plan: bool | None = None,
        cuda_graph: bool = True,
        look_ahead: bool = True,
        gpu_experts: int | str = 0,
        calibrate: str | Path | None = None,
        prefill_kv_chunk: int | str = "auto",
        dual_prefill: bool = True,
        kv_cache: str = "auto",
    ):
        """experts: 'cpu' runs routed experts in the C++ CPU engine (float checkpoints repacked to
        `experts_format`: bf16, int8 or int4; GGUF experts keep their blocks), 'torch' in plain torch.
        cpu_threads: the engine's worker threads (default: the cores this process may use; on a GPU
        run all but runtime.experts.GPU_FREE_CORES).
        device: where everything but the routed experts runs ('cpu', 'cuda', 'cuda:N').
        cpu_moe / n_cpu_moe_layers / placement: where the routed experts go (tandem.placement.rules):
        all in the CPU engine (the default), those of the first N MoE layers (the rest on the
        device, plain torch), or as a rules file says. vram_budget / ram_budget (GB) replace the
        measured free VRAM / available RAM the memory plan is checked against before loading.
        show_plan: print the plan to stderr (default: when `progress`).
        max_step_tokens: tokens one step feeds the model (decodes + prompt chunks); "auto": the
        largest of STEP_TOKEN_CHOICES whose workspace fits the budgets (chosen value: self.max_step_tokens).
        cuda_graph: on a CUDA device, replay each decode batch size's step as one CUDA graph
        (captured on first use); False runs every step eagerly (--no-cuda-graph).
        look_ahead: with CUDA graphs, queue each decode step before the previous one's tokens reach
        the host (runtime/engine.py), so the host's work between steps overlaps the model's
        (--no-look-ahead: each step waits for the host).
        gpu_experts: N hot experts per MoE layer get a float copy on `device` (the N that routing
        of the `calibrate` text -- a file, default a built-in mix -- uses most); "auto": as many
        as the VRAM budget leaves room for.
        prefill_kv_chunk: MLA models' prefill expands keys and values for this many context tokens
        at a time; "auto": the largest of KV_CHUNK_CHOICES whose workspace fits beside the chosen
        max_step_tokens (chosen value: self.prefill_kv_chunk).
        dual_prefill: on a CUDA device with routed experts in the CPU engine, prefill steps of at
        least layers.dual_experts.DUAL_MIN_TOKENS tokens split each layer's experts between the
        engine and the GPU, which copies its share from the engine's memory; the plan reserves
        runtime.experts.DUAL_BUFFER_BYTES for it (TANDEM_DUAL_BUFFER_MB: another size; at most a
        whole layer's experts; one expert's worth when less fits, none when not even that does).
        kv_cache: "auto" (the model's dtype) or "int8" (MLA models: int8 codes with a scale per 64
        values, about half of bf16's bytes; --kv-cache int8)."""
        if kv_cache not in ("auto", "int8"):
            raise TandemError(f"--kv-cache must be auto or int8, got {kv_cache!r}")
        if torch.device(device).type == "cuda" and experts == "cpu":
            _blocking_sync(torch.device(device).index or 0)
        options = PlacementOptions(device=device, experts=experts, cpu_moe=cpu_moe, n_cpu_moe_layers=n_cpu_moe_layers,
                                   rules_file=None if placement is None else str(placement))
        self.model_dir, self._config_dir = Path(model), config_dir
        with open_model_files(self.model_dir, config_dir) as files:
            self.hf_config = files.hf  # None for a GGUF model without --config-dir
            cfg = files.config()
            files.check_layer_count(cfg.num_hidden_layers)
            self.dtype = resolve_dtype(dtype, {"torch_dtype": files.stored_dtype})
            limit = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
            if max_context is not None and not 1 < max_context <= limit:
                raise TandemError(f"--max-context {max_context} is out of range: the model supports 2..{limit} tokens")
            self.max_context = max_context or min(limit, 8192)
            if max_batch < 1:
                raise TandemError(f"--max-batch must be >= 1, got {max_batch}")
            self.tokenizer = files.tokenizer()
            self.defaults = files.generation_defaults()
            # Plan on the meta model, from headers alone: refuse before any big allocation.
            try:
                net = meta_model(files.model_class(), cfg, self.dtype)
            except TandemError as e:  # the layers' checks of the config's numbers, which know no file
                raise TandemError(f"{self.model_dir}: {e}") from None
            if kv_cache == "int8":
                net.set_kv_int8()  # the plan counts the int8 rows
            self.placement = build_placement(options, experts_modules(net))
            ckpt, rename, _, derived = checkpoint_view(files, net)
            vram, ram, sources = budgets(device, vram_budget, ram_budget)
            tensors = stored_tensors(files.gguf if files.gguf is not None else ckpt)

            def plan(hot: int, step: int, kv_chunk: int, dual: int = 0):
                return plan_model(
                    net, tensors, rename, self.placement, max_context=self.max_context, max_batch=max_batch,
                    experts_format=experts_format, derived=derived, step_tokens=step, hot_experts=hot,
                    vram_budget=vram, ram_budget=ram, budget_sources=sources, kv_chunk=kv_chunk, dual_buffer=dual,
                )

            # Prompt chunks first (longer ones feed the experts more tokens each), then the context
            # chunk of MLA prefill (smaller ones cost only more, shorter passes), both beside the
            # dual path's buffer.
            kv_chunks = _kv_chunks(prefill_kv_chunk)
            want = _dual_want(plan(0, min(STEP_TOKEN_CHOICES), kv_chunks[-1]), dual_prefill, experts)
            step, chunk = _choose_chunks(max_step_tokens, kv_chunks, self.max_context, plan, want)
            self.max_step_tokens, self.prefill_kv_chunk = step, chunk
            self.plan = plan(0, step, chunk)
            dual = 0
            if want:
                dual = next((b for b in (want, self.plan.dual_expert_bytes) if _fits(plan(0, step, chunk, b))), 0)
                if not dual:
                    print("note: prefill stays on the CPU engine: no VRAM left to copy experts to the GPU",
                          file=sys.stderr)
                self.plan = plan(0, step, chunk, dual)
            self.gpu_experts = _hot_count(gpu_experts, self.plan)
            if self.gpu_experts:
                self.plan = plan(self.gpu_experts, step, chunk, dual)
            if files.gguf is None:
                ckpt.close()
            if progress if show_plan is None else show_plan:
                print(format_plan(self.plan), file=sys.stderr)
            check_fits(self.plan)
            self.model = load_model(files, self.dtype, device, progress, placement=self.placement)
        for module in self.model.modules():
            if isinstance(module, MLAttention):
                module.kv_chunk = self.prefill_kv_chunk
        if kv_cache == "int8":
            self.model.set_kv_int8()
        self.cpu_engine = None
        if any(t.backend == "engine" for t in experts_targets(self.model, self.placement).values()):
            self.cpu_engine = create_cpu_engine(cpu_threads, gpu=torch.device(device).type == "cuda")
            bind_cpu_engine(self.model, self.placement, self.cpu_engine, experts_format)
            if self.plan.dual_buffer:
                enable_dual_prefill(self.model, self.plan.dual_buffer, register=torch.device(device).type == "cuda")
        if self.tokenizer.vocab_size > self.model.embed.num_embeddings:
            raise TandemError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.model.embed.num_embeddings}: the config and the tokenizer do not belong together"
            )
        graphs = cuda_graph and torch.device(device).type == "cuda" and self._graphable()
        self.engine = Engine(
            self.model, self.tokenizer, max_context=self.max_context, max_batch=max_batch,
            max_step_tokens=self.max_step_tokens, device=device, dtype=self.dtype, cuda_graphs=graphs,
            look_ahead=graphs and look_ahead,
        )
        self.hot_experts: dict[str, list[int]] = {}
        if self.gpu_experts:
            if self.cpu_engine is None:
                raise TandemError("--gpu-experts needs the routed experts in the CPU engine (--experts cpu)")
            counts = routing_counts(self, calibration_tokens(self, calibrate))
            with self._checkpoint() as (ckpt, rename):
                self.hot_experts = place_hot_experts(self.model, counts, self.gpu_experts, ckpt, rename,
                                                     self.dtype, device)

    @contextlib.contextmanager
    def _checkpoint(self):
        """The model file's tensors and names (ckpt, rename), to read experts again after loading."""
        with open_model_files(self.model_dir, self._config_dir) as files:
            ckpt, rename, _, _ = checkpoint_view(files, self.model)
            try:
                yield ckpt, rename
            finally:
                if files.gguf is None:
                    ckpt.close()

    def rebalance_hot_experts(self, **policy) -> dict[str, list[int]]:
        """Re-place hot experts where the routing counted since the last call moved (the policy:
        runtime.hot_experts.moved_hot_experts); call between requests. The model file is opened
        only when a layer moves. Returns module -> new hot ids ({} when nothing moved enough)."""
        moves = moved_hot_experts(self.model, **policy) if self.hot_experts else {}
        if moves:
            with self._checkpoint() as (ckpt, rename):
                replace_hot_experts(self.model, moves, ckpt, rename, self.dtype)
            self.hot_experts.update(moves)
        return moves

    def _graphable(self) -> bool:
        """CUDA graphs need every routed-experts backend to be capturable: the CPU engine's stream
        path is (and HotExperts around it, placed later, whose decode path is three Triton kernels);
        plain-torch experts group tokens on the host (data-dependent), so they run eagerly. DualExperts
        leave decode-sized (and captured) steps to the engine's stream path."""
        eager = sorted({type(m.experts).__name__ for m in self.model.modules()
                        if hasattr(m, "experts") and type(m.experts).__name__ not in ("CpuExperts", "DualExperts")})
        if eager:
            print(f"note: decode runs without CUDA graphs: {', '.join(eager)} experts are not capturable",
                  file=sys.stderr)
        return not eager

    def sampling_params(self, **overrides) -> SamplingParams:
        """The model's generation_config defaults, overridden by the given (non-None) fields."""
        values = dict(self.defaults)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return SamplingParams(**values)
        except TypeError as e:
            raise TandemError(f"unknown sampling option: {e}") from None

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise TandemError("the prompt is empty: give some text")
            check_prompt_chars(prompt, self.max_context)
            return self.tokenizer.encode(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            check_prompt_chars(text, self.max_context)
            return self.tokenizer.encode(text, add_special_tokens=False)  # the template wrote the specials
        if all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TandemError("a prompt is a string, a list of chat messages (dicts) or a list of token ids")

    def stream(self, prompt: Prompt, **sampling) -> GenerationStream:
        ids = self.encode(prompt)
        params = self.sampling_params(**sampling)
        stream = GenerationStream(iter(()))
        stream._pieces = self._run(ids, params, stream)
        return stream

    def generate(self, prompt: Prompt, **sampling) -> Generation:
        stream = self.stream(prompt, **sampling)
        for _ in stream:
            pass
        return stream.result

    def _run(self, ids: list[int], params: SamplingParams, stream: GenerationStream) -> Iterator[str]:
        result = Generation("", [], ids, logprobs=None if params.logprobs is None else [])
        stream.result = result
        start = time.perf_counter()
        first = None
        with torch.inference_mode():
            for out in self.engine.stream(ids, params):
                if first is None:
                    first = time.perf_counter()
                    result.prefill_seconds = first - start
                result.token_ids.append(out.token)
                if result.logprobs is not None:
                    result.logprobs.append(out.logprobs)
                result.text += out.text
                result.decode_seconds = time.perf_counter() - first
                result.finish_reason = out.finish_reason
                if out.text:
                    yield out.text
