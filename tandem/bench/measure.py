"""Time a model through the runtime's public API (LLM / Engine): prefill, decode, several users, memory.

Every timed request gets fresh random token ids (seeded), so routing varies as in real use and
no cache of a previous prompt helps. Prefill at P tokens = time to first token of a P-token
prompt (one new token); decode = tokens/s of D tokens after a C-token context (the first token
comes from the prefill and is not counted). Warm-up runs are not timed; figures are medians of
the repeats. Peak RAM is the process's VmHWM (reset after loading where the kernel allows);
peak VRAM is torch's max reserved memory.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tandem.bench import dual_split
from tandem.errors import TandemError
from tandem.runtime.llm import LLM


@dataclass(frozen=True)
class BenchConfig:
    model: str
    prompts: tuple[int, ...] = (512, 2048, 8192)
    context: int = 1024
    decode_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "auto"
    users: int = 0  # 0: do not measure several users (the bound is still printed)
    seed: int = 0
    experts_format: str = "bf16"
    cuda_graph: bool = True
    look_ahead: bool = True  # queue each decode step before the last one's tokens reach the host
    max_step_tokens: int | str = "auto"  # as LLM chooses for chat and serve (a count: that many tokens a step)
    gpu_experts: int | str = 0  # hot experts per layer on the GPU (issue 11's curve); 0 in the protocol's runs
    dual_prefill: bool = True  # long prefill steps split each layer's experts with the GPU (issue 10)
    kv_cache: str = "auto"  # "int8": the int8 MLA cache

    def __post_init__(self):
        if not self.prompts or min(self.prompts) < 1:
            raise TandemError("--prompts needs positive token counts, e.g. 512,2048,8192")
        for name in ("context", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise TandemError(f"--{name.replace('_', '-')} must be >= 1")
        if self.warmup < 0 or self.users < 0:
            raise TandemError("--warmup and --users must be >= 0")

    @property
    def max_context(self) -> int:
        return max(max(self.prompts), self.context + self.decode_tokens) + 16


@dataclass
class Measured:
    load_seconds: float = 0.0
    ttft_s: dict[int, float] = field(default_factory=dict)  # prompt tokens -> median seconds
    prefill_tok_s: dict[int, float] = field(default_factory=dict)
    decode_tok_s: float = 0.0
    users_tok_s: float | None = None
    rss_loaded_gb: float = 0.0
    peak_rss_gb: float = 0.0
    peak_vram_gb: float | None = None  # torch's reserved peak (what nvidia-smi sees, minus the context)
    peak_allocated_gb: float | None = None  # tensors' peak while running: what the memory plan models
    load_peak_allocated_gb: float | None = None  # tensors' peak while loading (the loader's transients)
    plan_vram_gb: float | None = None
    samples: dict = field(default_factory=dict)  # every timed value, for the JSON
    # prompt tokens -> the last timed prefill's dual-path split per chunk (bench/dual_split.py);
    # empty where no layer splits (CPU runs, --no-dual-prefill, prompts under DUAL_MIN_TOKENS)
    prefill_split: dict[int, list[dict]] = field(default_factory=dict)


def _status_gb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def _reset_peak_rss() -> None:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def load(cfg: BenchConfig, progress: bool = True) -> tuple[LLM, float]:
    """The model as the runtime loads it, all routed experts in CPU RAM; (llm, seconds)."""
    kw = {"dtype": cfg.dtype, "device": cfg.device, "max_context": cfg.max_context, "max_batch": max(1, cfg.users),
              "progress": progress, "cpu_threads": cfg.threads, "experts_format": cfg.experts_format,
          "cuda_graph": cfg.cuda_graph, "max_step_tokens": cfg.max_step_tokens, "gpu_experts": cfg.gpu_experts,
          "dual_prefill": cfg.dual_prefill, "look_ahead": cfg.look_ahead,
          "kv_cache": cfg.kv_cache}
    if "cpu_moe" in inspect.signature(LLM.__init__).parameters:
        kw["cpu_moe"] = True  # the protocol: no routed expert on the GPU
    if torch.device(cfg.device).type == "cuda":
        # torch's CPU ops are incidental here (building step tensors); its OpenMP workers would spin
        # on the cores the expert engine's threads need.
        torch.set_num_threads(1)
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    llm = LLM(Path(cfg.model), **kw)
    return llm, time.perf_counter() - start


class Timer:
    """Runs the timed requests of one BenchConfig on one loaded LLM."""

    def __init__(self, llm: LLM, cfg: BenchConfig):
        self.llm, self.cfg = llm, cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.vocab = llm.tokenizer.vocab_size
        self.last_split: list[dict] = []  # the last prefill's dual-path split per chunk

    def prompt(self, n: int) -> list[int]:
        return self.rng.integers(0, self.vocab, size=n).tolist()

    def prefill(self, n: int) -> float:
        """Seconds to the first token of an n-token prompt (its dual-path split: last_split)."""
        since = dual_split.mark(self.llm.model)
        g = self.llm.generate(self.prompt(n), max_new_tokens=1, temperature=0.0, ignore_eos=True)
        self.last_split = dual_split.chunks(self.llm.model, since)  # after the timed part
        return g.prefill_seconds

    def decode(self, context: int, n: int) -> float:
        """tok/s of n tokens generated after a `context`-token prompt."""
        g = self.llm.generate(self.prompt(context), max_new_tokens=n + 1, temperature=0.0, ignore_eos=True)
        if len(g.token_ids) != n + 1:
            raise TandemError(f"decode stopped after {len(g.token_ids)} tokens ({g.finish_reason})")
        return g.decode_tok_s

    def users(self, users: int, context: int, n: int) -> float:
        """Aggregate decode tok/s of `users` requests running together (timed after all prefills)."""
        engine = self.llm.engine
        params = self.llm.sampling_params(max_new_tokens=n + 1, temperature=0.0, ignore_eos=True)
        ids = [engine.add_request(self.prompt(context), params) for _ in range(users)]
        started, tokens, start = set(), 0, 0.0
        with torch.inference_mode():
            while engine.has_work():
                outs = engine.step()
                if len(started) == users:
                    tokens += sum(not o.is_prefill for o in outs)
                for o in outs:
                    started.add(o.seq_id)
                if len(started) == users and not start:
                    start = time.perf_counter()  # every sequence has its first token: decode from here
        for i in ids:
            engine.abort(i)
        return tokens / (time.perf_counter() - start)


def run(llm: LLM, cfg: BenchConfig, log=print) -> Measured:
    """Warm up, then time every metric `repeats` times; medians."""
    m = Measured()
    m.rss_loaded_gb = _status_gb("VmRSS")
    _reset_peak_rss()
    cuda = torch.device(cfg.device).type == "cuda"
    timer = Timer(llm, cfg)
    for _ in range(cfg.warmup):
        for p in cfg.prompts:
            timer.prefill(p)
        timer.decode(min(cfg.context, 64), min(cfg.decode_tokens, 8))
        if cfg.users:  # the batch's CUDA graph is captured on its first step: not in a timed pass
            timer.users(cfg.users, min(cfg.context, 64), min(cfg.decode_tokens, 8))
    for p in cfg.prompts:
        times = [timer.prefill(p) for _ in range(cfg.repeats)]
        m.samples[f"ttft_{p}"] = times
        m.ttft_s[p] = statistics.median(times)
        m.prefill_tok_s[p] = p / m.ttft_s[p]
        if timer.last_split:
            m.prefill_split[p] = timer.last_split
        log(f"prefill {p:>6} tokens: {m.prefill_tok_s[p]:9.1f} tok/s (TTFT {m.ttft_s[p]:.3f} s)")
    rates = [timer.decode(cfg.context, cfg.decode_tokens) for _ in range(cfg.repeats)]
    m.samples["decode_tok_s"] = rates
    m.decode_tok_s = statistics.median(rates)
    log(f"decode {cfg.decode_tokens} tokens after {cfg.context}: {m.decode_tok_s:.2f} tok/s")
    if cfg.users:
        rates = [timer.users(cfg.users, cfg.context, cfg.decode_tokens) for _ in range(cfg.repeats)]
        m.samples["users_tok_s"] = rates
        m.users_tok_s = statistics.median(rates)
        log(f"{cfg.users} users: {m.users_tok_s:.2f} tok/s aggregate")
    m.peak_rss_gb = _status_gb("VmHWM")
    if cuda:
        m.peak_vram_gb = torch.cuda.max_memory_reserved() / 1e9
        m.peak_allocated_gb = torch.cuda.max_memory_allocated() / 1e9
        m.plan_vram_gb = llm.plan.vram / 1e9
    return m


def free_memory() -> None:
    """After the caller dropped its LLM: return its memory before the next model loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
