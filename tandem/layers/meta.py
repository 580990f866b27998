"""What one forward step needs to know about its batch, built by the runtime's Runner.

Models see batching only through this object. Tokens of all sequences are flattened into one
[T] axis; `query_start` marks where each sequence's new tokens begin.
"""

from dataclasses import dataclass

import torch


@dataclass
class ForwardMeta:
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    query_start: list[int]  # [B+1] offsets of each sequence's new tokens in the T axis
    context_lens: list[int]  # [B] tokens in the cache after this step (old + new)
    slot_mapping: torch.Tensor  # [T] int64, cache row each new token writes
    block_tables: list[list[int]]  # [B][blocks] cache blocks of each sequence, in order
    block_size: int
    kv: list[torch.Tensor]  # per layer [num_blocks * block_size, width] paged cache rows
    logits_indices: torch.Tensor | None = None  # rows of T whose logits are wanted (None: all)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def context_slots(self, seq: int) -> torch.Tensor:
        """Cache rows holding sequence `seq`'s tokens 0..context_len-1, in position order."""
        n = self.context_lens[seq]
        blocks = torch.tensor(self.block_tables[seq], dtype=torch.int64, device=self.slot_mapping.device)
        rows = (blocks[:, None] * self.block_size + torch.arange(self.block_size, device=blocks.device)).reshape(-1)
        return rows[:n]
