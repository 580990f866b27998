"""Prefill chunks on two paths at once (issue 10): an experts backend that wraps the CPU engine's
(CpuExperts) and, for steps of at least `min_tokens` tokens, hands part of a layer's experts to the
model's device, which copies their weights out of the engine's own memory (the engine's tiled
layout: no second copy of the experts anywhere) and computes them while the engine computes the
rest.

Data path of one long step:
    (prepare, steps of >= SHARED_FIRST_MIN_TOKENS: the counts' copy to the host queued ahead, so
     the MoE block can queue its shared experts before submit, which waits on that copy alone)
    ids [T, k] -> tokens per expert (one host sync) -> split(counts): the device's experts S
    -> the CPU engine gets ids with S masked (-1): submit, returns at once
    -> per batch of S: copy the experts' slabs host -> device on a copy stream (the next batch's
       copies start before this one computes: double buffering), decode them straight into the
       model's dtype (ops/triton/tiled.py), run them on their tokens: grouped matmuls over the
       step's rows sorted once by expert, each run's outputs summed into one fp32 sum
       (ops.reference.moe_experts_grouped; where torch has no grouped kernels for the device or
       dtype: batched matmuls padded to each run's busiest expert, moe_experts_padded)
    -> wait for the engine; out = engine's part + device's part
    -> (steps of >= PRESTAGE_MIN_TOKENS tokens; TANDEM_DUAL_PRESTAGE=1: every long step, 0: none)
       start copying the next layer's likely first run (its experts hottest in its last long
       step, as many as its first run would hold were its tokens spread like this step's), so
       the link works through that layer's attention and routing; that layer takes the run first

The split and the rates it learns from measured times: layers/dual_rates.py. The slabs'
page-locking and copies: layers/dual_copies.py.
Shorter steps (decode) stay on the engine alone.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from tandem.layers.dual_copies import copy_stream, register, stage, unregister
from tandem.layers.dual_rates import DualRates, SharedRates, cpu_seconds, learned, split
from tandem.ops import reference as ops
from tandem.ops.staging import to_device

log = logging.getLogger(__name__)

DUAL_MIN_TOKENS = 128  # shorter steps leave every expert to the engine
HISTORY_STEPS = 4096  # long steps a layer remembers (DualExperts.history)
PAGEABLE_H2D = 10e9  # bytes/s of copies from memory the driver would not page-lock (staged by the driver)


PRESTAGE_MARGIN = 1.25  # a run staged ahead is sized for this many times the tokens expected
# Steps at least this long stage ahead by default. At 8K the link is what a step waits for, and
# staging gained in all seven A/B rounds (sessions 26 and 28: V2-Lite +5, +26, +5, +10, +10%, V3's
# 6-layer file +0.2, +6%); at 512 it moved V2-Lite -10, +6, -15, -11% (there the host is what a
# step waits for, and staging adds host time to every layer) and V3's file +20, +35%.
PRESTAGE_MIN_TOKENS = 4096


def prestage_enabled(tokens: int) -> bool:
    """Whether a layer's long step of `tokens` tokens also starts copying the next layer's likely
    first run (stage_ahead), so the link keeps working through the next layer's attention and
    routing. TANDEM_DUAL_PRESTAGE=1: every long step; 0: none; unset (or another value): steps of
    at least PRESTAGE_MIN_TOKENS."""
    switch = os.environ.get("TANDEM_DUAL_PRESTAGE")
    if switch in ("0", "1"):
        return switch == "1"
    return tokens >= PRESTAGE_MIN_TOKENS


# Long steps at least this long queue the MoE block's shared experts before the routed ones' host
# sync (DualExperts.prepare): session 29's 8K timeline (V2-Lite, the device taking every expert)
# had the GPU idle ~0.5 ms a layer from the counts' sync until the host queued the first run, about
# the shared experts' work at 8K. Shorter steps keep them after submit, which starts the engine
# sooner (its job is launched from the stream, behind whatever is queued before it). Session 30
# (one H100 box, V2-Lite, two rounds alternating): 8K 30,230 / 29,617 tok/s with them first against
# 29,487 / 27,508 without (+3%, +8%); forced first at 2K (the engine takes a share there) 7,442 /
# 6,884 against 9,371 / 7,929 (-21%, -13%).
SHARED_FIRST_MIN_TOKENS = 4096


def shared_first_enabled(tokens: int, min_tokens: int = DUAL_MIN_TOKENS) -> bool:
    """Whether a dual step of `tokens` tokens runs the shared experts first (prepare).
    TANDEM_SHARED_FIRST=1: every long step (>= min_tokens); 0: none; unset: >= SHARED_FIRST_MIN_TOKENS."""
    if tokens < min_tokens:  # decode steps: no environment lookup
        return False
    switch = os.environ.get("TANDEM_SHARED_FIRST")
    return switch == "1" if switch in ("0", "1") else tokens >= SHARED_FIRST_MIN_TOKENS


def run_rows(run: Sequence[int], counts: Sequence[int], grouped: bool) -> int:
    """Token rows a run's matmuls take: each expert's own tokens (grouped matmuls), or the run's
    busiest expert's count for every expert (padded batched matmuls)."""
    return sum(counts[e] for e in run) if grouped else len(run) * max((counts[e] for e in run), default=0)


class DualExperts(nn.Module):
    def __init__(self, cpu_experts: nn.Module, num_experts: int, hidden: int, inter: int,
                 rates: DualRates | None = None, min_tokens: int = DUAL_MIN_TOKENS, buffer_bytes: int = 1 << 30,
                 shared: SharedRates | None = None):
        """buffer_bytes: device memory the device's share may use at once (the plan's dual_buffer);
        experts go through it in batches, at least one at a time. rates: where learning starts;
        shared: the learned rates of the model's dual layers (a new SharedRates: this layer's own)."""
        super().__init__()
        self.cpu_experts, self.num_experts, self.hidden, self.inter = cpu_experts, num_experts, hidden, inter
        self.rates, self.min_tokens, self.buffer_bytes = rates or DualRates(), min_tokens, buffer_bytes
        native = cpu_experts.engine._native
        nodes = len(cpu_experts.engine.threads_per_node)
        # Per node, per projection: (slab uint8 [E, groups, group_bytes] viewing the engine's memory, info).
        self.slabs = [
            {p: (torch.from_numpy(native.weight_slab(cpu_experts.layer, n, p)), native.weight_slab_info(cpu_experts.layer, n, p))
             for p in ("gate", "up", "down")}
            for n in range(nodes)
        ]
        self.expert_bytes = sum(s.shape[1] * s.shape[2] for node in self.slabs for s, _ in node.values())
        self.flops_per_token = 6.0 * hidden * inter  # gate, up, down: 2 FLOPs per weight
        self.last_split: list[int] = []  # the device's experts in the last long step (tests, profiles)
        self.last_runs: list[list[int]] = []  # ... in their runs
        self.last_counts: list[int] = []  # tokens per expert in the last long step (rank, stage_ahead)
        self.prefetched = 0  # runs whose copies started while the run before computed (tests, profiles)
        self.next_layer = None  # the model's next dual layer (enable_dual_prefill): a link, see __setattr__
        self._ahead: tuple | None = None  # (experts, staged, device): a first run the layer before staged
        self.prestaged = 0  # long steps whose first run the layer before had copied (tests, profiles)
        self._registered = False
        self._locked: set[int] = set()  # the slabs register_slabs page-locked (their addresses)
        self._step: dict | None = None  # the last long step's predictions and timers, until learned from
        self.shared = shared if shared is not None else SharedRates()
        self.pageable = False  # the driver refused to page-lock the slabs: copies at PAGEABLE_H2D
        # Each long step once learned from: its split and each side's bytes, FLOPs and measured
        # seconds (None where not measured), for `tandem bench`'s split per chunk (bench/dual_split.py).
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY_STEPS)
        self.steps_recorded = 0  # long steps appended to history so far (a mark survives the deque's turnover)
        self._prepared: tuple | None = None  # (ids, event): prepare's copy of the counts, for the next submit
        self._counts_host: torch.Tensor | None = None  # pinned, what prepare copies the counts into

    def __setattr__(self, name: str, value) -> None:
        # next_layer is a link, not a submodule: registered, every layer would nest all those after
        # it (one layer's modules() walked the rest of the model, and profiles read each layer's
        # engine calls once per layer before it: session 9's 682 ms of "engine jobs" per 15 ms step).
        if name == "next_layer":
            if value is not None and not isinstance(value, DualExperts):
                raise TypeError(f"next_layer must be a DualExperts or None, got {type(value).__name__}")
            self.__dict__["_next_layer"] = value
            return
        super().__setattr__(name, value)

    @property
    def next_layer(self) -> "DualExperts | None":
        return self.__dict__.get("_next_layer")

    @property
    def rank(self) -> list[int]:
        """The experts by tokens in the last long step, most first ([] before one): sorted only when
        prestaging asks (stage_ahead), not on every step."""
        counts = self.last_counts
        return sorted(range(self.num_experts), key=lambda e: -counts[e]) if counts else []

    def rates_for(self, tokens: int) -> DualRates:
        rates = self.shared.rates_for(tokens, self.rates)
        return replace(rates, h2d_bw=min(rates.h2d_bw, PAGEABLE_H2D)) if self.pageable else rates

    @staticmethod
    def supports(cpu_experts: nn.Module) -> str:
        """'' when the engine's layer can be read on a device (tiled layout, formats the decoder
        knows), else why not."""
        from tandem.ops.triton.tiled import FORMATS  # triton: imported on first use

        info = cpu_experts.engine.layer_info(cpu_experts.layer)
        if info["row_group"] < 2:
            return "the engine's kernels keep the file's rows (generic ISA), not the tiled layout"
        unknown = [f for f in info["formats"] if f not in FORMATS]
        return f"no device decoder for {', '.join(unknown)}" if unknown else ""

    def _counts_on_device(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens per expert, on ids' device, slot 0 counting the -1 ids (a boolean mask, and
        bincount sizing its output on a GPU, would each sync the host once more)."""
        slot = ids.reshape(-1).long() + 1
        return torch.zeros(self.num_experts + 1, dtype=torch.long, device=ids.device).scatter_add_(
            0, slot, torch.ones_like(slot))

    def prepare(self, x: torch.Tensor, ids: torch.Tensor) -> bool:
        """Before submit, for steps the device would otherwise idle through: queue the token counts'
        copy to the host and an event after it, and return True, so that the caller may queue other
        device work (the MoE block's shared experts) that runs while submit waits on that event
        alone and splits, instead of the stream draining at submit's sync. False (nothing queued):
        not a CUDA step of at least SHARED_FIRST_MIN_TOKENS tokens (TANDEM_SHARED_FIRST=1: every
        long step, 0: none), or a graph capture."""
        self._prepared = None
        # the token count first: every MoE block asks, decode steps included (eager ones each layer)
        if (not shared_first_enabled(x.shape[0], self.min_tokens) or not x.is_cuda
                or torch.cuda.is_current_stream_capturing()):
            return False
        if self._counts_host is None:  # slot 0 counts the -1 ids, as _counts_on_device's
            self._counts_host = torch.empty(self.num_experts + 1, dtype=torch.long, pin_memory=True)
        self._counts_host.copy_(self._counts_on_device(ids), non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(x.device))
        self._prepared = (ids, done)
        return True

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        prepared, self._prepared = self._prepared, None
        if x.shape[0] < self.min_tokens or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self.cpu_experts.submit(x, ids, weights), None  # the split needs a host sync
        if prepared is not None and prepared[0] is ids:  # prepare queued the copy: wait for it alone
            prepared[1].synchronize()
            counts = self._counts_host[1:].tolist()
        else:  # tokens per expert in one host sync, .tolist(): the -1 ids' slot dropped
            counts = self._counts_on_device(ids)[1:].tolist()
        self.shared.learn_pending()  # the sync above ran the stream past every earlier long step
        rates = self.rates_for(x.shape[0])
        grouped = ops.grouped_mm_supported(x.dtype, x.device, self.hidden, self.inter)  # else padded batches
        ahead = self._take_ahead(counts, x.dtype, grouped)
        # A staged run whose copies have not finished delays the device by what is left of them:
        # at most all of it (the copy stream is FIFO; its event says only done or not).
        busy = (len(ahead[0]) * self.expert_bytes / rates.h2d_bw
                if ahead and ahead[1][1] is not None and not ahead[1][1].query() else 0.0)
        taken = split(counts, self.expert_bytes, self.flops_per_token, rates, ahead[0] if ahead else (), busy)
        self.last_counts = counts
        self.last_split = taken
        cpu_s = cpu_seconds(counts, self.expert_bytes, self.flops_per_token, rates)
        # the bytes of the experts whose copies this step times (not a run the layer before staged)
        copied = (len(taken) - (len(ahead[0]) if ahead else 0)) * self.expert_bytes
        on_device = set(taken)
        step = self._step = {"cpu": sum(cpu_s) - sum(cpu_s[e] for e in taken), "cpu_measured": None,
                             "t0": time.monotonic_ns(),  # steady_clock, as the engine's timestamps
                             "device": busy + copied / rates.h2d_bw,
                             "events": None,
                             "bucket": x.shape[0].bit_length(), "rates": rates,
                             "record": {"tokens": x.shape[0], "active": sum(c > 0 for c in counts),
                                        "runs": 0, "overlapped_runs": 0,
                                        "device_experts": len(taken), "device_bytes": copied,
                                        "cpu_bytes": sum(c > 0 and e not in on_device for e, c in enumerate(counts))
                                        * self.expert_bytes,
                                        "cpu_flops": sum(c for e, c in enumerate(counts) if e not in on_device)
                                        * self.flops_per_token}}
        self.shared.pending.append(self)
        if not taken:
            handle = self.cpu_experts.submit(x, ids, weights)
            self._note_call(step, x)
            return handle, None
        if ahead:  # the first run is the one the layer before copied
            runs = [ahead[0]] + (self.batches(taken[len(ahead[0]):], counts, x.dtype, grouped)
                                 if len(taken) > len(ahead[0]) else [])
        else:
            runs = self.batches(taken, counts, x.dtype, grouped)  # bounded device memory per batch
        # The runs' order (each run by expert id, so neighbours copy at once), which local ids count in.
        taken = self.last_split = [e for run in runs for e in run]
        # Two maps of a routed id, made on the host and copied once (to_device: no stream sync):
        # its local id on the device (-1: not there) and its id for the engine (-1: not there);
        # index E stands for id -1, which indexing reaches as the last entry.
        on_dev, on_cpu = [-1] * (self.num_experts + 1), list(range(self.num_experts)) + [-1]
        for j, e in enumerate(taken):
            on_dev[e], on_cpu[e] = j, -1
        maps = to_device(on_dev + on_cpu, torch.long, ids.device).view(2, -1)
        local, engine_ids = maps[:, ids.long()].unbind(0)
        stream = torch.cuda.current_stream(x.device) if x.is_cuda else None
        if stream is not None:
            step["events"] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            step["events"][0].record(stream)
        staged = following = None
        try:
            if ahead:
                staged = ahead[1]
                self.prestaged += 1
            self.last_runs = runs
            step["record"]["runs"] = len(runs)
            # Every routed slot on the device (long steps once the link outruns the engine): no
            # engine call, so no trip of x to the host and of a zero output back over the link.
            on_engine = sum(counts) - sum(counts[e] for e in taken)
            handle = (self.cpu_experts.submit(x, engine_ids.to(torch.int32), weights)
                      if on_engine else None)
            if not ahead:
                # The engine's job first: queueing the run's copies (one a projection and expert, ~1.5 ms
                # of host time for V2-Lite's ~40) before it delayed the engine's start by as much; the
                # copies wait only for its inputs' copy to the host (~2 MB, the link's other direction).
                # A/B: docs/benchmarks.md, section 5 (session 20).
                staged = self._stage(runs[0], x.device)
            if handle is not None:
                self._note_call(step, x)
            else:
                step["call"], step["cpu_measured"] = None, 0.0  # nothing ran on the engine: nothing to learn
            dev, b0 = None, 0
            if grouped:  # the device's rows sorted by local id once: each run's rows follow one another
                flat = local.reshape(-1)
                rows = flat.argsort(stable=True)[flat.numel() - sum(counts[e] for e in taken):]  # -1 sorts first
                row_tokens, row_weights = rows // ids.shape[1], weights.reshape(-1)[rows].float()
                summed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                r0 = 0
            for i, chunk in enumerate(runs):
                # Double buffering: the next run's copies start before this run computes, when both
                # fit the buffer (batch_bytes counts a run's worth of blocks for it).
                nxt = runs[i + 1] if i + 1 < len(runs) else None
                early = nxt is not None and (self.batch_bytes(len(chunk), run_rows(chunk, counts, grouped), x.dtype)
                                             - len(chunk) * self.expert_bytes + len(nxt) * self.expert_bytes
                                             <= self.buffer_bytes)
                following = self._stage(nxt, x.device) if early else None
                self.prefetched += early
                step["record"]["overlapped_runs"] += early
                mats = self._decode(len(chunk), staged, x.device, x.dtype)
                if grouped:
                    r1 = r0 + sum(counts[e] for e in chunk)
                    ops.moe_experts_grouped(x, row_tokens[r0:r1], row_weights[r0:r1], *mats,
                                            [counts[e] for e in chunk], summed)
                    r0 = r1
                else:
                    in_chunk = (local >= b0) & (local < b0 + len(chunk))
                    part = ops.moe_experts_padded(x, torch.where(in_chunk, local - b0, -1), weights, *mats,
                                                  [counts[e] for e in chunk])
                    dev = part if dev is None else dev + part
                b0 += len(chunk)
                # This run's blocks go back to the compute stream's pool (in its order) before the
                # next run is staged, so at most two runs of blocks are held at once.
                staged = None
                if early:
                    staged, following = following, None
                elif nxt is not None:
                    staged = self._stage(nxt, x.device)
        finally:
            if stream is not None and (staged is not None or following is not None):
                # A run staged but never decoded (an error): its copies may still be writing
                # blocks the pool would hand out again; queue the compute stream after them.
                stream.wait_stream(copy_stream(x.device))
        if grouped:
            dev = summed.to(x.dtype)
        if step["events"]:
            step["events"][1].record(stream)
            step["recorded"] = True
        if prestage_enabled(x.shape[0]) and self.next_layer is not None:
            self.next_layer.stage_ahead(x, counts)
        return handle, dev

    def stage_ahead(self, x: torch.Tensor, counts: Sequence[int]) -> None:
        """Start copying this layer's likely first run of a step like x's, whose tokens per expert
        the layer before counted (`counts`): its own experts as hot as in its last long step (none
        yet: nothing), given those counts in that order, split and batched as submit would, each
        count PRESTAGE_MARGIN times larger so that the run still fits the buffer with its real
        counts (_take_ahead). Its copies queue behind the device work queued so far."""
        self.drop_ahead()
        if not self.last_counts or x.shape[0] < self.min_tokens or len(counts) != self.num_experts:
            return
        likely = [0] * self.num_experts
        for e, c in zip(self.rank, sorted(counts, reverse=True)):
            likely[e] = c
        taken = split(likely, self.expert_bytes, self.flops_per_token, self.rates_for(x.shape[0]))
        if not taken:
            return
        grouped = ops.grouped_mm_supported(x.dtype, x.device, self.hidden, self.inter)
        roomy = [int(c * PRESTAGE_MARGIN) + 1 for c in likely]
        run = self.batches(taken, roomy, x.dtype, grouped)[0]
        self._ahead = (run, self._stage(run, x.device), x.device)

    def drop_ahead(self) -> None:
        """Let go of blocks staged ahead and not used (see _let_go)."""
        ahead, self._ahead = self._ahead, None
        self._let_go(ahead)

    @staticmethod
    def _let_go(ahead) -> None:
        """Before a staged run's blocks are dropped, the compute stream waits for their copies (the
        pool hands their memory out again in that stream's order)."""
        if ahead is not None and ahead[1][1] is not None:
            torch.cuda.current_stream(ahead[2]).wait_event(ahead[1][1])

    def _take_ahead(self, counts: list[int], dtype: torch.dtype, grouped: bool):
        """The run staged ahead for this step, if it still fits the buffer with these counts (as
        batches() allows, one expert always does)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        run = ahead[0]
        if len(run) > 1 and self.batch_bytes(len(run), run_rows(run, counts, grouped), dtype) > self.buffer_bytes:
            self._let_go(ahead)
            return None
        return ahead

    def wait(self, pending, add: torch.Tensor | None = None) -> torch.Tensor:
        """The routed experts' output (+ add): the engine's part (+ the device's part) (+ add)."""
        handle, dev = pending
        if handle is None:  # the device took every routed slot
            return dev if add is None else dev + add
        out = self.cpu_experts.wait(handle, add if dev is None else None)  # the engine alone may fuse the add
        step = self._step
        if step is not None and step.get("call") is None and step["cpu_measured"] is None:
            step["cpu_measured"] = self.cpu_experts.engine.last_phases()["done"] / 1e3  # a synchronous engine job
        if dev is not None:
            out = out + dev.to(device=out.device, dtype=out.dtype)
            out = out if add is None else out + add
        return out

    def _note_call(self, step: dict, x: torch.Tensor) -> None:
        """Keep the HostCall a stream submit just enqueued (its engine timestamps are read later)
        and its run count, or None off CUDA."""
        call = getattr(self.cpu_experts, "last_stream_call", None) if x.is_cuda else None
        # the run count once this submit ran, read before the stream could run it (reading
        # call.calls here races with the stream's host function / doorbell thread)
        step["call"], step["calls"] = call, self.cpu_experts.last_stream_runs if call is not None else None

    def learn(self) -> None:
        """Fold this layer's last long step's measured times into the shared rates (see `learned`
        and SharedRates: not the first step of a length and format) and append its record to
        `history`; once per step. The next long step of any layer calls it; so may anyone once
        the stream ran past the step (`tandem bench` does after each timed prefill)."""
        step, self._step = self._step, None
        if step is None:
            return
        cpu_measured, call = step["cpu_measured"], step.get("call")
        if call is not None:
            launch, done = call.engine_ns
            # a call that ran again since (a decode graph of this length) holds another job's times
            fresh = call.calls == step.get("calls") and done > launch >= step["t0"]
            cpu_measured = (done - launch) / 1e9 if fresh else None
        device_measured = None
        if step["events"] is not None and step.get("recorded") and step["events"][1].query():
            device_measured = step["events"][0].elapsed_time(step["events"][1]) / 1e3
        first = (step["bucket"], tuple(self.cpu_experts.formats))
        shared = self.shared
        if first in shared.seen:
            now = shared.rates_for(step["record"]["tokens"], self.rates)
            shared.by_bucket[step["bucket"]] = learned(
                step["rates"], (step["cpu"], cpu_measured) if cpu_measured else None,
                # a layer whose copies the driver stages (pageable) would teach the link's rate wrong
                (step["device"], device_measured) if device_measured and not self.pageable else None, now)
        else:  # the first step of a length and format: recorded, not learned from (see SharedRates)
            shared.seen.add(first)
        self.history.append(dict(step["record"], cpu_s=cpu_measured, device_s=device_measured,
                                 cpu_predicted_s=step["cpu"], device_predicted_s=step["device"]))
        self.steps_recorded += 1

    def batch_bytes(self, n: int, rows: int, dtype: torch.dtype) -> int:
        """Device bytes of a batch of n experts whose matmuls take `rows` token rows (run_rows):
        each expert holds its blocks, its weights in `dtype` (decoded in place) and as many blocks
        again for the next batch's copies (double buffering) - what MemoryPlan.dual_expert_bytes
        counts - and each row x, gate, up, h, y in `dtype` and fp32 copies of x and y. What a step
        holds whatever its runs (the fp32 sum, the padded input) is MemoryPlan.dual_step, outside
        the buffer."""
        numel = self.hidden * self.inter
        per_expert = 2 * self.expert_bytes + 3 * numel * dtype.itemsize
        per_token = (2 * self.hidden + 3 * self.inter) * dtype.itemsize + 12 * self.hidden
        return n * per_expert + rows * per_token

    def batches(self, taken: list[int], counts: list[int], dtype: torch.dtype,
                grouped: bool = False) -> list[list[int]]:
        """`taken` in consecutive runs that fit buffer_bytes (batch_bytes), at least one expert each,
        each run by expert id (neighbouring experts' slabs copy at once: _stage). grouped: the runs'
        matmuls take each expert's own tokens (run_rows), else every expert is padded to the run's
        busiest, and as the hottest experts come first, the first runs hold fewer."""
        runs: list[list[int]] = []
        run: list[int] = []
        total = most = 0  # the run's tokens and its busiest expert's (run_rows, kept as the run grows)
        for e in taken:
            c = counts[e]
            rows = total + c if grouped else (len(run) + 1) * max(most, c)
            if run and self.batch_bytes(len(run) + 1, rows, dtype) > self.buffer_bytes:
                runs.append(run)
                run, total, most = [], 0, 0
            run.append(e)
            total, most = total + c, max(most, c)
        if run:
            runs.append(run)
        return [sorted(r) for r in runs]

    def _stage(self, experts: list[int], device: torch.device):
        """Start copying these experts' blocks to `device` (dual_copies.stage; the slabs page-locked
        first on CUDA): {(node, proj): uint8 [n, groups, group_bytes]} and the event that marks
        them copied (None off CUDA)."""
        if device.type == "cuda" and not self._registered:
            self.register_slabs()
        return stage(self.slabs, self._locked, experts, device)

    def _decode(self, n: int, staged, device: torch.device, dtype: torch.dtype):
        """w_gate, w_up [n, I, H] and w_down [n, H, I] in `dtype` from staged blocks (_stage): each
        node's slice decoded straight into place (ops/triton/tiled.py)."""
        from tandem.ops.triton.tiled import dequantize  # triton: imported on first use

        blocks, done = staged
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
        # gate and up as the halves of one [n, 2I, H] tensor: the grouped matmuls take both at once
        gate_up = torch.empty(n, 2 * self.inter, self.hidden, dtype=dtype, device=device)
        full = {"gate": gate_up[:, : self.inter], "up": gate_up[:, self.inter :],
                "down": torch.empty(n, self.hidden, self.inter, dtype=dtype, device=device)}
        for node_index, node in enumerate(self.slabs):
            for proj, (_, info) in node.items():
                i0, i1 = info["slice"]  # this node's share of I: gate/up rows, down columns
                into = full[proj][:, :, i0:i1] if proj == "down" else full[proj][:, i0:i1]
                dequantize(blocks[(node_index, proj)], info["format"], info["rows"], info["cols"], info["row_group"],
                           out=into)
        return full["gate"], full["up"], full["down"]

    def device_weights(self, experts: list[int], dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w_gate, w_up [n, I, H] and w_down [n, H, I] of these experts in `dtype` on `device`,
        copied out of the engine's memory and decoded there (the device share's own path): hot
        experts take their float copies this way instead of dequantizing the file on the host."""
        device = torch.device(device)
        return self._decode(len(experts), self._stage(list(experts), device), device, dtype)

    def register_slabs(self) -> int:
        """Page-lock the engine's slabs once (at load, enable_dual_prefill; else at the layer's
        first long step), so the copies run at the link's speed, asynchronously; returns the bytes
        locked. Where the driver refuses, copies still work, staged through the driver's own
        pinned buffers, and the split counts the slower rate (PAGEABLE_H2D)."""
        if self._registered:
            return 0
        self._registered = True
        done, refused = register(self.slabs)
        if refused is not None:
            log.warning("engine layer %d: %s; its copies to the GPU will be slower", self.cpu_experts.layer, refused)
            self.rates = replace(self.rates, h2d_bw=min(self.rates.h2d_bw, PAGEABLE_H2D))
            self.pageable = True
        if done:  # undone before the slabs (this object's, keeping the engine alive) are let go
            weakref.finalize(self, unregister, done)
            self._locked = set(done)
        return sum(s.numel() for node in self.slabs for s, _ in node.values() if s.data_ptr() in self._locked)

    def extra_repr(self) -> str:
        return f"steps of >= {self.min_tokens} tokens split with the device; {self.rates}"

