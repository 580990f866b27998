"""What one forward step needs to know about its batch, built by the runtime's Runner.

Models see batching only through this object. Tokens of all sequences are flattened into one
[T] axis; `query_start` marks where each sequence's new tokens begin.

Two views of the same batch: Python lists (query_start, context_lens, block_tables), which the
plain-torch attention loops over, and device tensors (positions, slot_mapping, block_table,
seq_of_token), which the attention kernels read. A step captured in a CUDA graph may use only
the tensors: their contents change between replays, the lists are those of the captured batch.
"""

from dataclasses import dataclass, field

import torch

from tandem.ops.staging import to_device


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
    # For the attention kernels (ops/triton/attention.py); None: attention runs in plain torch.
    block_table: torch.Tensor | None = None  # [B, max_blocks] int32, padded block tables
    seq_of_token: torch.Tensor | None = None  # [T] int32, the block_table row of each new token
    max_query_len: int = 0  # most new tokens of one sequence (decode kernels serve short ones)
    max_context: int = 0  # no sequence's context exceeds this (the kernels' split count; fixed per CUDA graph)
    # context_slots' rows per sequence, made once a step (every attention layer reads them)
    _slots: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def kernels(self) -> bool:
        return self.block_table is not None

    def context_slots(self, seq: int) -> torch.Tensor:
        """Cache rows holding sequence `seq`'s tokens 0..context_len-1, in position order: made on
        the first call of a step, from pinned memory on a GPU. A copy from pageable memory waits
        for the stream: each attention layer of a long step waited there for the layer before's
        routed experts (the CPU engine's answer), so it could not queue its kernels under them."""
        rows = self._slots.get(seq)
        if rows is None:
            dev = self.slot_mapping.device
            blocks = to_device(self.block_tables[seq], torch.int64, dev)
            rows = (blocks[:, None] * self.block_size + torch.arange(self.block_size, device=dev)).reshape(-1)
            rows = self._slots[seq] = rows[: self.context_lens[seq]]
        return rows
