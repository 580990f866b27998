"""Hot routed experts on the device beside the CPU engine: an experts backend that wraps another.

The N experts of a layer that routing uses most (chosen by the runtime from router statistics)
keep a copy on the model's device and run there; every other (token, expert) pair
goes to the wrapped backend (the CPU engine) with the hot slots masked out (-1). Both halves start
before either is waited on, so the device's share overlaps the CPU's. Fewer expert bytes cross
DRAM per token: that is the point. The copy is either float tensors (w_gate/w_up [N, I, H],
w_down [N, H, I]) or, for a GGUF whose formats the GPU kernels decode, the file's blocks
(`Blocks` [N, rows, row_bytes]: a Q4_K_M expert is ~0.28x its bf16 size, in VRAM and in the
HBM bytes a token reads).

Data path: ids [T, k] -> local index of each id among the hot ones (-1: cold) -> cold ids (hot
masked) -> cold.submit(x, cold_ids, w) -> hot experts on the device -> cold.wait + hot. On a GPU,
decode-sized steps (up to HOT_KERNEL_MAX_SLOTS (token, expert) slots) run the hot experts in
ops/triton/moe.py's three kernels (float), moe_q8.py's two (split rows of any GPU block format,
int8 activations) or moe_quant.py's three (blocks as stored, when split is off; no host sync: a CUDA graph
captures them with the CPU engine's stream calls) on a side stream, beside the shared experts that
the layer launches next on its own (wait() joins it); longer steps (prefill chunks) and CPU devices
group tokens in torch (blocks: dequantizing the routed hot experts per call). The split
itself is one kernel on a GPU (ops/triton/moe.py's hot_split): it runs before the CPU call can
start. A layer whose experts are all hot never calls the wrapped backend; one holding them in id
order on split rows skips the split too (its ids are the hot indices; moe_q8's first kernel
counts them). The side stream has a high priority: at 100% hot its kernels are the longer
branch, the shared experts fill in around them.

Routing is counted online (`counts` [E] on the device: a tally with one more slot for the padding
id -1, so a call adds its ids as they are, captured in graphs too), so the runtime can re-place
the hot set between requests (`replace`: in place, so captured graphs stay valid).
"""

import contextlib

import torch
from torch import nn

from tandem.errors import TandemError
from tandem.layers.block_experts import Blocks, block_moe
from tandem.layers.norm import fused_path
from tandem.ops import reference as ops

_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}  # device index -> the hot kernels' stream
_SIDE_PRIORITY = -1  # the side stream's priority (lower runs first): the hot kernels are the longer branch
HOT_KERNEL_MAX_SLOTS = 256  # T x k: each slot re-reads its expert's weights, fine for decode only


class HotExperts(nn.Module):
    def __init__(self, cold: nn.Module, num_experts: int, hot_ids: list[int],
                 w_gate: torch.Tensor | Blocks, w_up: torch.Tensor | Blocks, w_down: torch.Tensor | Blocks):
        super().__init__()
        n = len(hot_ids)
        if not 0 < n <= num_experts or len(set(hot_ids)) != n or not all(0 <= e < num_experts for e in hot_ids):
            raise TandemError(f"hot experts must be distinct ids in 0..{num_experts - 1}, got {hot_ids}")
        tensors = [_data(w) for w in (w_gate, w_up, w_down)]
        if len({isinstance(w, Blocks) for w in (w_gate, w_up, w_down)}) != 1:
            raise TandemError("hot expert weights must be all float tensors or all blocks")
        if not all(t.shape[0] == n for t in tensors):
            raise TandemError(f"hot expert weights must hold {n} experts each")
        self.cold, self.num_experts, self.hot_ids = cold, num_experts, list(hot_ids)
        # Plain attributes: bound after loading, no state_dict entries or dtype casts wanted.
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        device = tensors[0].device
        self.lookup = torch.full((num_experts + 1,), -1, dtype=torch.long, device=device)  # last: id -1
        self._index(self.hot_ids)
        self._tally = torch.zeros(num_experts + 1, dtype=torch.long, device=device)  # last: id -1
        self.counts = self._tally[:num_experts]  # routing seen since the last reset (a view)

    def replace(self, hot_ids: list[int], w_gate: torch.Tensor | Blocks, w_up: torch.Tensor | Blocks,
                w_down: torch.Tensor | Blocks) -> None:
        """Hold other experts (as many, weights shaped as now): copied in place, so CUDA graphs that
        captured this layer read the new ones."""
        n = len(self.hot_ids)
        if len(hot_ids) != n or len(set(hot_ids)) != n or not all(0 <= e < self.num_experts for e in hot_ids):
            raise TandemError(f"replace takes {n} distinct expert ids in 0..{self.num_experts - 1}, got {hot_ids}")
        pairs = [(self.w_gate, w_gate), (self.w_up, w_up), (self.w_down, w_down)]
        for dst, src in pairs:
            if isinstance(src, Blocks) != self.blocks or _data(src).shape != _data(dst).shape or (
                self.blocks and (src.format, src.split) != (dst.format, dst.split)
            ):
                raise TandemError(f"replacement hot expert weights must be like the held ones: {_describe(dst)}, "
                                  f"got {_describe(src)}")
        if (list(hot_ids) == list(range(self.num_experts))) != self._identity:
            raise TandemError("a layer holding every expert in id order keeps that order, and one not in it stays "
                              "out of it: captured CUDA graphs pass its ids to the kernels as they are")
        for dst, src in pairs:
            _data(dst).copy_(_data(src))
        self.lookup.fill_(-1)
        self._index(hot_ids)
        self.hot_ids = list(hot_ids)

    def _index(self, hot_ids: list[int]) -> None:
        """lookup[e] = e's slot among the hot experts (in place: captured graphs read it)."""
        dev = self.lookup.device
        self.lookup[torch.tensor(hot_ids, device=dev)] = torch.arange(len(hot_ids), device=dev)
        self._identity = list(hot_ids) == list(range(self.num_experts))  # every expert, in id order

    @property
    def blocks(self) -> bool:
        """The copy is the file's blocks (else float tensors)."""
        return isinstance(self.w_gate, Blocks)

    @property
    def all_hot(self) -> bool:
        """Every expert of the layer is here: the wrapped backend is never called."""
        return len(self.hot_ids) == self.num_experts

    def split(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cold ids with hot slots -1, local hot index with cold slots -1), both int32 [T, k]."""
        ids = ids.to(self.lookup.device)
        if fused_path(ids):  # one launch instead of six: it sits before the CPU call, on its path
            from tandem.ops.triton.moe import hot_split  # triton: imported on first use

            return hot_split(ids, self.lookup, self._tally)
        ids = ids.long()
        flat = torch.where(ids < 0, self.num_experts, ids).view(-1)
        self._tally.index_add_(0, flat, torch.ones_like(flat))
        local = self.lookup[flat].view(ids.shape)
        cold = torch.where(local >= 0, -1, ids)
        return cold.to(torch.int32), local.to(torch.int32)

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        device = self.lookup.device
        xd, wd = x.to(device), weights.to(device)
        kernel = fused_path(xd) and ids.numel() <= HOT_KERNEL_MAX_SLOTS and ids.shape[1] <= 16
        g, u, d = self.w_gate, self.w_up, self.w_down
        # All hot in id order on split rows: the ids are the hot indices and the kernels count them,
        # so no split launch sits on the step's path.
        direct = kernel and self._identity and self.blocks and g.split and ids.dtype == torch.int32
        if direct:
            handle, local, tally = None, ids.to(device).contiguous(), self._tally
        else:
            cold_ids, local = self.split(ids)
            handle = None if self.all_hot else self.cold.submit(x, cold_ids.to(ids.device), weights)
            tally = None
        side = _side_stream(device) if kernel and device.type == "cuda" else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if kernel and self.blocks and g.split:
                from tandem.ops.triton.moe_q8 import moe_decode_split  # triton: imported on first use

                hot = moe_decode_split(xd, local, wd, g.data, u.data, d.data, g.format, u.format, d.format, tally)
            elif kernel and self.blocks:
                from tandem.ops.triton.moe_quant import moe_decode_blocks  # triton: imported on first use

                hot = moe_decode_blocks(xd, local, wd, g.data, u.data, d.data, g.format, u.format, d.format)
            elif kernel:
                from tandem.ops.triton.moe import moe_decode  # triton: imported on first use

                hot = moe_decode(xd, local, wd, g, u, d)
            elif self.blocks:
                hot = block_moe(xd, local, wd, g, u, d)
            else:
                hot = ops.moe_experts(xd, local, wd, g, u, d)
        # The side stream's inputs ride along until wait() joins it: freed earlier, the caching
        # allocator could hand their memory to the main stream while the side kernels still read it.
        return handle, hot, x, (side, xd, local, wd)

    def wait(self, pending, add: torch.Tensor | None = None) -> torch.Tensor:
        handle, hot, x, (side, *_inputs) = pending
        if side is not None:
            torch.cuda.current_stream(side.device).wait_stream(side)
        if handle is None:  # all hot
            routed = hot.to(device=x.device, dtype=x.dtype)
        else:
            cold = self.cold.wait(handle)
            routed = cold + hot.to(device=cold.device, dtype=cold.dtype)
        return routed if add is None else routed + add  # in MoE's order: (cold + hot) + shared

    @property
    def hot_bytes(self) -> int:
        return sum(_data(w).numel() * _data(w).element_size() for w in (self.w_gate, self.w_up, self.w_down))

    def extra_repr(self) -> str:
        held = "/".join(w.format for w in (self.w_gate, self.w_up, self.w_down)) if self.blocks else str(
            self.w_gate.dtype).removeprefix("torch.")
        return f"hot={len(self.hot_ids)}/{self.num_experts} {held} on {self.lookup.device}: {self.hot_ids}"


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The device's stream for hot-expert kernels (one per device, shared by the layers), forked
    from the current stream: the kernels run beside what the layer launches next (the shared
    experts), and a CUDA graph captures the fork and the join as two branches."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index, priority=_SIDE_PRIORITY)
    stream.wait_stream(torch.cuda.current_stream(index))
    return stream


def _data(w: torch.Tensor | Blocks) -> torch.Tensor:
    return w.data if isinstance(w, Blocks) else w


def _describe(w: torch.Tensor | Blocks) -> str:
    if isinstance(w, Blocks):
        return f"{w.format} {'split rows' if w.split else 'blocks'} {tuple(w.data.shape)}"
    return f"{w.dtype} {tuple(w.shape)}"
