"""Runs one Batch through the model: builds ForwardMeta (positions, cache slots, block tables),
calls the model, returns the logits of the last fed token of each sequence that samples this step
(a sequence feeding a middle chunk of its prompt gets none: ForwardMeta.logits_indices skips it)."""

import torch

from tandem.layers.meta import ForwardMeta
from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.scheduler import Batch


class Runner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, torch.device(device)

    def build_meta(self, batch: Batch, all_logits: bool = False) -> tuple[torch.Tensor, ForwardMeta]:
        ids, positions, slots, query_start, context_lens = [], [], [], [0], []
        for seq, fed in zip(batch.seqs, batch.new_tokens):
            start = seq.num_cached
            ids += fed
            positions += range(start, start + len(fed))
            slots += self.cache.slots(seq.block_table, start, start + len(fed))
            query_start.append(query_start[-1] + len(fed))
            context_lens.append(start + len(fed))
        dev = self.device
        wanted = [q - 1 for q, flag in zip(query_start[1:], batch.sample) if flag]
        last = None if all_logits else torch.tensor(wanted, dtype=torch.int64, device=dev)
        meta = ForwardMeta(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            query_start=query_start,
            context_lens=context_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=[list(s.block_table) for s in batch.seqs],
            block_size=self.cache.block_size,
            kv=self.cache.kv,
            logits_indices=last,
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), meta

    @torch.inference_mode()
    def run(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """fp32 logits: [N, V] (last token of each of the N sampling sequences) or [T, V] with all_logits."""
        ids, meta = self.build_meta(batch, all_logits)
        return self.model(ids, meta)
