"""Runs one Batch through the model: builds ForwardMeta (positions, cache slots, block tables),
calls the model, returns the logits of the last fed token of each sequence that samples this step
(a sequence feeding a middle chunk of its prompt gets none: ForwardMeta.logits_indices skips it).

With `kernels`, ForwardMeta also carries the device tensors the attention kernels read (padded
block tables, the sequence of each token). With `cuda_graphs`, a decode-only step of B sequences
(one new token each, all sampling) replays a CUDA graph captured for B on first use: static input
buffers are filled, the graph runs the whole model (GPU kernels, copies and the CPU experts' host
functions), and its static logits come back. Everything else runs eagerly. `run_next` queues the
decode step after a decode step with its tokens still on the device (the engine's look-ahead).
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tandem.layers.meta import ForwardMeta
from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.scheduler import Batch, Sequence

log = logging.getLogger(__name__)

@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # [B] int64
    meta: ForwardMeta  # its tensors are the static inputs
    logits: torch.Tensor  # [B, V] static output


class Runner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, device: torch.device, *,
                 kernels: bool | None = None, cuda_graphs: bool = False, max_context: int | None = None):
        self.model, self.cache, self.device = model, cache, torch.device(device)
        self.kernels = self.device.type == "cuda" if kernels is None else kernels
        if cuda_graphs and (self.device.type != "cuda" or not self.kernels):
            raise ValueError("CUDA graphs need a CUDA device and the attention kernels")
        self.cuda_graphs = cuda_graphs
        self.max_context = max_context or cache.num_blocks * cache.block_size
        self.max_blocks = cache.blocks_for(self.max_context)
        self._graphs: dict[int, _Graph] = {}
        self._pool = None

    def build_meta(self, batch: Batch, all_logits: bool = False) -> tuple[torch.Tensor, ForwardMeta]:
        ids, positions, slots, query_start, context_lens, owner = [], [], [], [0], [], []
        for i, (seq, fed) in enumerate(zip(batch.seqs, batch.new_tokens)):
            start = seq.num_cached
            ids += fed
            positions += range(start, start + len(fed))
            slots += self.cache.slots(seq.block_table, start, start + len(fed))
            query_start.append(query_start[-1] + len(fed))
            context_lens.append(start + len(fed))
            owner += [i] * len(fed)
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
        if self.kernels:
            meta.block_table = self._block_rows([s.block_table for s in batch.seqs]).to(self.device)
            meta.seq_of_token = torch.tensor(owner, dtype=torch.int32, device=dev)
            meta.max_query_len = max(len(f) for f in batch.new_tokens)
            meta.max_context = max(context_lens)
        return torch.tensor(ids, dtype=torch.int64, device=dev), meta

    def _block_rows(self, tables: list[list[int]]) -> torch.Tensor:
        # Filled row by row in numpy: per decode step this is B x max_blocks entries (8K for 16
        # sequences at 8K context), too many for Python lists on the hot path.
        width = max(self.max_blocks, max(len(t) for t in tables))
        rows = np.full((len(tables), width), self.cache.scratch_block, dtype=np.int32)
        for i, t in enumerate(tables):
            rows[i, : len(t)] = t
        return torch.from_numpy(rows)

    @torch.inference_mode()
    def run(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """fp32 logits: [N, V] (last token of each of the N sampling sequences) or [T, V] with all_logits."""
        if self.cuda_graphs and not all_logits and batch.is_decode:
            return self._replay(batch)
        ids, meta = self.build_meta(batch, all_logits)
        return self.model(ids, meta)

    # --- CUDA graphs -------------------------------------------------------------------------
    def _replay(self, batch: Batch) -> torch.Tensor:
        ids = torch.tensor([f[0] for f in batch.new_tokens], dtype=torch.int64)
        return self._replay_decode(ids, [s.num_cached for s in batch.seqs], [s.block_table for s in batch.seqs])

    def _replay_decode(self, ids: torch.Tensor, positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Sequence i feeds ids[i] (host or device) at positions[i]: the graph for len(positions)."""
        g = self._graphs.get(len(positions)) or self._capture(len(positions))
        m = g.meta
        slots = [self.cache.slots(t, p, p + 1)[0] for t, p in zip(tables, positions)]
        # From pinned memory: copies from pageable memory may wait for the stream (a look-ahead
        # step is queued behind the running one); torch's pinned cache keeps each buffer until its copy ran.
        g.ids.copy_(ids, non_blocking=True)
        m.positions.copy_(torch.tensor(positions, dtype=torch.int64).pin_memory(), non_blocking=True)
        m.slot_mapping.copy_(torch.tensor(slots, dtype=torch.int64).pin_memory(), non_blocking=True)
        m.block_table.copy_(self._block_rows(tables).pin_memory(), non_blocking=True)
        g.graph.replay()
        return g.logits

    @torch.inference_mode()
    def run_next(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the decode step after `batch` (one token fed and sampled per sequence),
        each sequence feeding its token in `tokens` [B], a device tensor: queued on the stream
        before the tokens reach the host. The caller has grown the block tables by one token."""
        ids = tokens.clamp(min=0)  # a NAN_LOGITS row's sequence ends; any id keeps the step valid
        positions = [s.num_cached + 1 for s in batch.seqs]
        if self.cuda_graphs:
            return self._replay_decode(ids, positions, [s.block_table for s in batch.seqs])
        ahead = [Sequence(s.seq_id, [], s.params, block_table=s.block_table, num_cached=p)
                 for s, p in zip(batch.seqs, positions)]
        _, meta = self.build_meta(Batch(ahead, [[0]] * len(ahead)))
        return self.model(ids, meta)

    def _capture(self, b: int) -> _Graph:
        dev, scratch = self.device, self.cache.scratch_block * self.cache.block_size
        meta = ForwardMeta(
            positions=torch.zeros(b, dtype=torch.int64, device=dev),
            query_start=list(range(b + 1)),
            context_lens=[1] * b,
            slot_mapping=torch.full((b,), scratch, dtype=torch.int64, device=dev),  # warm-up writes go to scratch
            block_tables=[[self.cache.scratch_block]] * b,
            block_size=self.cache.block_size,
            kv=self.cache.kv,
            logits_indices=torch.arange(b, device=dev),
            block_table=torch.full((b, self.max_blocks), self.cache.scratch_block, dtype=torch.int32, device=dev),
            seq_of_token=torch.arange(b, dtype=torch.int32, device=dev),
            max_query_len=1,
            max_context=self.max_context,
        )
        ids = torch.zeros(b, dtype=torch.int64, device=dev)
        # Warm up on a side stream (Triton compiles, host calls and staging are made), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(ids, meta)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model(ids, meta)
        log.info("captured a CUDA graph for decode batches of %d", b)
        self._graphs[b] = _Graph(graph, ids, meta, logits)
        return self._graphs[b]
