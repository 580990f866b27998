"""Paged KV cache: per-layer tensors of fixed-size token blocks and a free list of blocks.

Each sequence owns a block table (block ids in position order); a token at position p lives in
row block_table[p // block_size] * block_size + p % block_size of every layer's tensor.
One more block than `num_blocks`, never handed out (`scratch_block`), takes the writes of steps
that must not touch live rows (CUDA-graph warm-up) and pads block tables.
"""

import math

import torch

from tandem.errors import TandemError


class PagedKVCache:
    def __init__(self, widths: list[int], num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self.kv = [torch.zeros((num_blocks + 1) * block_size, w, dtype=dtype, device=device) for w in widths]
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def grow(self, block_table: list[int], n_tokens: int) -> None:
        """Append blocks to `block_table` until it holds n_tokens tokens."""
        need = self.blocks_for(n_tokens) - len(block_table)
        if need > len(self._free):
            raise TandemError(
                f"KV cache is full: {n_tokens} tokens need {need} more blocks, {len(self._free)} free; "
                "raise --max-context or run fewer requests at once"
            )
        block_table.extend(self._free.pop() for _ in range(max(need, 0)))

    def release(self, block_table: list[int]) -> None:
        self._free.extend(reversed(block_table))
        block_table.clear()

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache rows for positions start..end-1 of a sequence."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]
