"""Which sequences run in the next step, and their bookkeeping (continuous batching).

Every step decodes one token for each running sequence whose prompt is cached, and spends what is
left of the step's token budget (`max_step_tokens`) on prompt chunks: first of sequences already
admitted whose prompt is partly cached, then of newly admitted ones. A long prompt thus takes several
steps (chunked prefill); a sequence samples its first token in the step that caches the end of its
prompt. Sequences join and leave the batch at every step. Admission reserves the whole prompt's KV
blocks plus `reserve_tokens` more; a sequence that does not fit waits. The engine decides when a
sequence finishes; the scheduler frees it.
"""

from collections import deque
from dataclasses import dataclass, field

import torch

from tandem.errors import TandemError
from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.sampling import SamplingParams


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        return self.num_cached >= len(self.prompt)


@dataclass
class Batch:
    seqs: list[Sequence]
    new_tokens: list[list[int]]  # tokens each sequence feeds this step
    is_prefill: bool = False  # some sequence feeds prompt tokens this step
    sample: list[bool] | None = None  # per sequence: sample a token this step? (None: all do)

    def __post_init__(self) -> None:
        if self.sample is None:
            self.sample = [True] * len(self.seqs)

    @property
    def sampling(self) -> list[Sequence]:
        return [s for s, flag in zip(self.seqs, self.sample) if flag]

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds one token and samples (what a CUDA graph replays, and look-ahead queues)."""
        return all(len(f) == 1 for f in self.new_tokens) and all(self.sample)


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch: int, max_step_tokens: int = 512,
                 reserve_tokens: int | None = None):
        if max_step_tokens < 1:
            raise TandemError(f"--max-step-tokens must be >= 1, got {max_step_tokens}")
        self.cache = cache
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.reserve_tokens = cache.block_size if reserve_tokens is None else reserve_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted, in admission order (prompt cached or being cached)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _fits(self, seq: Sequence) -> bool:
        need = self.cache.blocks_for(len(seq.prompt) + self.reserve_tokens) - len(seq.block_table)
        return need <= self.cache.free_blocks

    def schedule(self, admit: bool = True) -> Batch | None:
        """The next step's batch; with admit False no waiting sequence joins it (the engine's
        look-ahead already ran this step's decodes: new ones join the step after)."""
        seqs: list[Sequence] = []
        fed: list[list[int]] = []
        sample: list[bool] = []
        budget = self.max_step_tokens
        # 1. Decode: one token for every sequence whose prompt is cached.
        for seq in self.running:
            if seq.prefilled:
                self.cache.grow(seq.block_table, len(seq.tokens))
                seqs.append(seq)
                fed.append([seq.tokens[-1]])
                sample.append(True)
                budget -= 1
        # 2. Admit waiting sequences while the batch and the KV cache have room (their prompt's
        #    blocks are taken now, so later chunks never run out of cache).
        while admit and self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self._fits(seq) and self.running:
                break  # wait for running sequences to free blocks
            self.waiting.popleft()
            self.cache.grow(seq.block_table, len(seq.prompt))  # alone, a prompt always fits (else: a clear error)
            self.running.append(seq)
        # 3. Prompt chunks, in admission order, within what is left of the budget.
        prefill = False
        for seq in self.running:
            if seq.prefilled or budget <= 0:
                continue
            n = min(len(seq.prompt) - seq.num_cached, budget)
            seqs.append(seq)
            fed.append(seq.prompt[seq.num_cached : seq.num_cached + n])
            sample.append(seq.num_cached + n == len(seq.prompt))
            budget -= n
            prefill = True
        if not seqs:
            return None
        return Batch(seqs, fed, is_prefill=prefill, sample=sample)

    def update(self, batch: Batch, sampled: list[int]) -> None:
        """Record the step: fed tokens are cached; each sequence that sampled gains its token
        (`sampled` holds one token per sampling sequence, in batch order)."""
        tokens = iter(sampled)
        for seq, fed, flag in zip(batch.seqs, batch.new_tokens, batch.sample):
            seq.num_cached += len(fed)
            if flag:
                seq.output.append(next(tokens))

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq.block_table)
