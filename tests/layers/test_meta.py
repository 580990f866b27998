"""ForwardMeta.context_slots: the cache rows of a sequence's context, made once a step (each
attention layer of a step reads the same tensor; on a GPU it is copied from pinned memory, so
a layer never waits there for the work queued before it)."""

import dataclasses

import pytest
import torch

from tandem.layers.meta import ForwardMeta


def meta(tables: list[list[int]], lens: list[int], device: str) -> ForwardMeta:
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    return ForwardMeta(positions=zero, query_start=[0, 1], context_lens=lens, slot_mapping=zero,
                       block_tables=tables, block_size=4, kv=[])


def check(device: str) -> None:
    m = meta([[5, 2, 7], [1]], [10, 3], device)
    rows = m.context_slots(0)
    assert rows.device.type == device and rows.dtype == torch.int64
    assert rows.tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29]  # blocks 5, 2, 7 in order, 10 tokens
    assert m.context_slots(1).tolist() == [4, 5, 6]
    assert m.context_slots(0) is rows  # made once: every later layer reads the same rows
    other = dataclasses.replace(m, block_tables=[[3], [1]], context_lens=[2, 3])
    assert other.context_slots(0).tolist() == [12, 13]  # another step's meta: its own rows
    assert m.context_slots(0) is rows


def test_context_slots_are_the_blocks_rows_in_order_made_once_a_step():
    check("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_context_slots_on_the_gpu():
    check("cuda")
