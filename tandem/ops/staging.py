"""Small host lists onto a device inside a step: row indices, token ids, biases (runtime), a
sequence's cache rows (layers/meta.py), expert offsets and lookups (the MoE paths).

A tensor made from a Python list on a GPU is a pageable copy, which waits for everything queued on
the stream (the whole forward pass) before the host can go on; staged through pinned memory the
copy is queued like a kernel and the host keeps working (e.g. filling grammar masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a 1-D tensor on `device`, without a host sync on a GPU."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)
