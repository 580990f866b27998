"""Which sequences run in the next step, and their bookkeeping.

Sequences wait until their prompt is prefilled, then decode one token per step. A step is either
a prefill of waiting sequences or a decode of all running ones (mixing both is the continuous-
batching issue's work). The engine decides when a sequence finishes; the scheduler frees it.
"""

from collections import deque
from dataclasses import dataclass, field

import torch

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


@dataclass
class Batch:
    seqs: list[Sequence]
    new_tokens: list[list[int]]  # tokens each sequence feeds this step
    is_prefill: bool


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch: int):
        self.cache = cache
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        if self.waiting and len(self.running) < self.max_batch:
            seqs = []
            while self.waiting and len(self.running) + len(seqs) < self.max_batch:
                seq = self.waiting[0]
                if self.cache.blocks_for(len(seq.prompt)) > self.cache.free_blocks and (seqs or self.running):
                    break  # wait for running sequences to free blocks
                self.waiting.popleft()
                self.cache.grow(seq.block_table, len(seq.prompt))
                seqs.append(seq)
            if seqs:
                return Batch(seqs, [s.prompt for s in seqs], is_prefill=True)
        if not self.running:
            return None
        for seq in self.running:
            self.cache.grow(seq.block_table, len(seq.tokens))
        return Batch(list(self.running), [[s.tokens[-1]] for s in self.running], is_prefill=False)

    def update(self, batch: Batch, sampled: list[int]) -> None:
        """Record the step: new tokens are cached, each sequence gains its sampled token."""
        for seq, fed, token in zip(batch.seqs, batch.new_tokens, sampled):
            seq.num_cached += len(fed)
            seq.output.append(token)
        if batch.is_prefill:
            self.running.extend(batch.seqs)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq.block_table)
