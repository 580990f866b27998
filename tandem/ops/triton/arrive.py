"""Arrival counters: the last program of a group to arrive finishes the group's work in the same
launch (sums partial results in a fixed order), instead of a launch of its own after the group.

`arrive(cnt, expected)` in a kernel: after the program's stores, a CTA barrier and one acq_rel
atomic on its group's counter; True for the last of `expected` programs, which resets the counter
(so it is 0 again for the next launch) and may then read the group's stores (through L2: `.cg`).

`counters(owner, device, n)` on the host: an int32 buffer of at least n zeros per (owner, device),
shared by every launch of that owner on that device, so launches of one owner on a device must not
overlap (each owner launches on one stream at a time). A buffer outgrown stays allocated (CUDA graphs
captured with it still use it); none is made while a graph is being captured (its zeroing would run
only at replays): an eager call before the capture makes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["arrive", "counters"]

MIN_COUNTERS = 1 << 18  # 1 MB: DeepSeek-V3's 256 hot slots take ~24K, a 16-token decode step ~10K
_BUFFERS: dict[tuple[str, int], torch.Tensor] = {}  # (owner, device index) -> counters
_OUTGROWN: list[torch.Tensor] = []  # buffers replaced by bigger ones, kept for the graphs that use them


@triton.jit
def arrive(cnt, expected):
    """Count this program in at cnt (after its stores: a CTA barrier, then one acq_rel atomic);
    True for the last of `expected` programs, which resets the counter for the next launch."""
    tl.debug_barrier()
    last = tl.atomic_add(cnt, 1, sem="acq_rel") == expected - 1
    if last:
        tl.atomic_xchg(cnt, 0)
    return last


def counters(owner: str, device: torch.device, n: int) -> torch.Tensor:
    """`owner`'s arrival counters on `device`: at least n, all 0 between launches."""
    key = (owner, device.index if device.type == "cuda" else -1)
    cnt = _BUFFERS.get(key)
    if cnt is None or cnt.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{owner} needs {n} arrival counters on {device} and has "
                             f"{0 if cnt is None else cnt.numel()}: call it once outside the capture first")
        if cnt is not None:
            _OUTGROWN.append(cnt)
        cnt = _BUFFERS[key] = torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device)
    return cnt
