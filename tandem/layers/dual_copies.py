"""The CPU engine's expert slabs on their way to a device, for the dual path (dual_experts.py).

    register(slabs): page-lock the large slabs in place (cuMemHostRegister), so copies from them
        run at the link's speed, asynchronously; unregister(addresses) undoes it (a finalizer:
        deferred while a CUDA graph is being captured)
    stage(slabs, locked, experts, device): blocks of these experts on the device, copied on the
        device's copy stream (copy_stream) in stretches of neighbouring experts (stretches): the
        page-locked slabs' copies in one driver call (ops/cuda_host.copy_batch), others by copy_;
        an event marks them copied
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

REGISTER_MIN_BYTES = 2 << 20  # the engine's allocations from here up start on a 2 MiB page of their own
_COPY_STREAMS: dict[int, "torch.cuda.Stream"] = {}  # device index -> the slabs' copy stream
_PENDING: list[int] = []  # slabs to unregister once no capture is under way


def stretches(experts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(index, first expert, count) of each stretch of consecutive ids in `experts`: the slabs hold
    the experts in id order, so a stretch is one contiguous copy."""
    out: list[tuple[int, int, int]] = []
    for j, e in enumerate(experts):
        if out and e == out[-1][1] + out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((j, e, 1))
    return out


def copy_stream(device: torch.device):
    """The device's stream for the slabs' copies (one per device, shared by the layers), or None
    off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _COPY_STREAMS.get(index)
    if stream is None:
        stream = _COPY_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def stage(slabs: list[dict], locked: set[int], experts: list[int], device: torch.device):
    """Start copying these experts' blocks out of `slabs` (per node, per projection: (slab uint8
    [E, groups, group_bytes], info)) to `device`, on the copy stream so that the copies run while
    the compute stream works: {(node, proj): uint8 [n, groups, group_bytes]} and the event that
    marks them copied (None off CUDA). `locked`: the addresses of the page-locked slabs."""
    stream = copy_stream(device)
    # The blocks come from the compute stream's pool, which hands memory out again in that
    # stream's order (bounded like the buffer: a copy stream's own pool would hold a third run
    # while events drain); the copies wait for the work queued on it so far, which may still
    # read that memory, and the compute stream waits for the copies (DualExperts._decode).
    staged = {(n, proj): torch.empty((len(experts),) + tuple(slab.shape[1:]), dtype=torch.uint8, device=device)
              for n, node in enumerate(slabs) for proj, (slab, _) in node.items()}
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        raw = []  # (destination, source, bytes) of the page-locked slabs' copies: one driver call
        spans = stretches(experts)  # one copy a stretch of neighbouring experts
        for n, node in enumerate(slabs):
            for proj, (slab, _) in node.items():
                into, size = staged[(n, proj)], slab[0].numel()
                if stream is not None and slab.data_ptr() in locked and slab.is_contiguous():
                    raw += [(into.data_ptr() + j * size, slab.data_ptr() + e * size, count * size)
                            for j, e, count in spans]
                else:
                    for j, e, count in spans:
                        into[j : j + count].copy_(slab[e : e + count], non_blocking=True)
        if raw:
            from tandem.ops.cuda_host import copy_batch

            copy_batch(raw, stream)
        done = stream.record_event() if stream is not None else None
    return staged, done


def register(slabs: list[dict]) -> tuple[list[int], RuntimeError | None]:
    """Page-lock the slabs of at least REGISTER_MIN_BYTES that start on such a boundary (smaller
    or unaligned ones may share pages with other allocations: TANDEM_HUGEPAGES=0); returns the
    addresses locked (for unregister) and the driver's refusal, if any, which stops there."""
    from tandem.ops.cuda_host import register_host

    if _PENDING:
        unregister([])
    done: list[int] = []
    try:
        for node in slabs:
            for slab, _ in node.values():
                if slab.numel() >= REGISTER_MIN_BYTES and slab.data_ptr() % REGISTER_MIN_BYTES == 0:
                    register_host(slab.data_ptr(), slab.numel())
                    done.append(slab.data_ptr())
    except RuntimeError as e:
        return done, e
    return done, None


def unregister(addresses: list[int]) -> None:
    """Undo register for these addresses (a DualExperts' finalizer: it may run in any garbage
    collection, even during a CUDA graph capture, when neither a sync nor cuMemHostUnregister is
    allowed: then the next registration does it)."""
    from tandem.ops.cuda_host import unregister_host

    _PENDING.extend(addresses)
    try:
        if torch.cuda.is_current_stream_capturing():
            return
        torch.cuda.synchronize()  # no copy may still read them
        while _PENDING:
            unregister_host(_PENDING.pop())
    except RuntimeError as e:  # interpreter shutdown: the driver may be gone
        log.debug("unregistering engine slabs: %s", e)
