"""Triton prefill attention with log-sum-exp (ops/triton/prefill.py) against reference.attention_lse,
and chunked attention merged through merge_attention against one pass over all keys.

Cases: MLA's shape (a per-head part plus a rope part shared by every head) and grouped-query heads
without one; key chunks wholly before the queries, crossing their diagonal, and after some of them
(those queries see nothing: o = 0, lse = -inf); query and key counts that are not multiples of the
tiles. Keys and values are views into larger NaN-filled buffers, so reading past the chunk fails.

CPU runs the kernel in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a
GPU); CUDA compiles it. On a GPU machine run twice: plain for CUDA, TRITON_INTERPRET=1 for CPU.
"""

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from tandem.ops import reference
from tandem.ops.triton import prefill
from tests.conftest import triton_device

INTERPRETED = isinstance(prefill._prefill_kernel, InterpretedFunction)
SMALL = prefill.PrefillConfig(block_m=16, block_n=16)
FP32_BOUND = 1e-5
# bf16 inputs (the reference reads the same values in fp32): the kernel rounds the probabilities
# to bf16 for p @ V, ~2^-9 relative.
BF16_BOUND = 1e-2


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return triton_device(request, INTERPRETED)


def _poisoned(shape, extra_rows: int, g, dtype, device):
    """A [rows, ...] tensor of random values that is a view of a buffer continuing with NaN rows."""
    buf = torch.full((shape[0] + extra_rows, *shape[1:]), float("nan"))
    buf[: shape[0]] = torch.randn(shape, generator=g)
    return buf.to(dtype).to(device)[: shape[0]]


def _inputs(tq, tk, nh, nkv, d1, d2, dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, nh, d1, generator=g).to(dtype).to(device)
    k = _poisoned((tk, nkv, d1), 7, g, dtype, device)
    v = _poisoned((tk, nkv, dv), 7, g, dtype, device)
    pe = {}
    if d2:
        pe = {"q_pe": torch.randn(tq, nh, d2, generator=g).to(dtype).to(device),
              "k_pe": _poisoned((tk, d2), 7, g, dtype, device)}
    return q, k, v, pe


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# (tq, tk, q_offset, k_offset): keys wholly before the queries, ending on their diagonal (one
# prompt chunk's own keys), crossing it mid-tile, and starting after the first queries.
CHUNKS = [(37, 50, 120, 0), (37, 37, 60, 60), (33, 45, 60, 40), (40, 30, 10, 25)]


@pytest.mark.parametrize("shape", [(4, 4, 32, 16, 32), (6, 2, 16, 0, 24)], ids=["mla", "gqa"])
@pytest.mark.parametrize("chunk", CHUNKS, ids=["past", "diagonal", "crossing", "after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference(device, shape, chunk, dtype):
    nh, nkv, d1, d2, dv = shape
    tq, tk, q_off, k_off = chunk
    q, k, v, pe = _inputs(tq, tk, nh, nkv, d1, d2, dv, dtype, device)
    o, lse = prefill.attention_lse(q, k, v, 0.3, q_off, k_off, config=SMALL, **pe)
    ro, rlse = reference.attention_lse(q, k, v, 0.3, q_off, k_off, **pe)
    assert o.dtype == lse.dtype == torch.float32 and o.shape == (tq, nh, dv) and lse.shape == (tq, nh)
    unseen = rlse.isinf()
    assert torch.equal(lse.isinf().cpu(), unseen.cpu())
    if chunk == CHUNKS[3]:
        assert unseen.any() and not unseen.all()  # queries before the chunk see nothing of it
    assert (o[unseen] == 0).all()
    bound = FP32_BOUND if dtype == torch.float32 else BF16_BOUND
    assert _rel(o, ro) <= bound
    assert (lse[~unseen] - rlse[~unseen]).abs().max().item() <= bound


@pytest.mark.parametrize("kv_chunk", [16, 23, 64])
def test_chunks_merge_to_one_pass(device, kv_chunk):
    # A 40-token prompt chunk at positions 60..99 over 100 keys, attended kv_chunk keys at a time.
    nh, d1, d2, dv = 4, 32, 16, 32
    q, k, v, pe = _inputs(40, 100, nh, nh, d1, d2, dv, torch.float32, device, seed=1)
    whole = reference.attention(
        torch.cat((q, pe["q_pe"]), -1), torch.cat((k, pe["k_pe"][:, None].expand(-1, nh, -1)), -1), v, 0.3, 60
    )
    o = lse = None
    for start in range(0, 100, kv_chunk):
        part = slice(start, start + kv_chunk)
        o_c, lse_c = prefill.attention_lse(q, k[part], v[part], 0.3, 60, start, q_pe=pe["q_pe"],
                                           k_pe=pe["k_pe"][part], config=SMALL)
        o, lse = (o_c, lse_c) if o is None else reference.merge_attention(o, lse, o_c, lse_c)
    assert _rel(o, whole) <= FP32_BOUND


def test_bad_shapes_are_refused():
    q, k, v, pe = _inputs(4, 5, 4, 2, 16, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        prefill.attention_lse(q[:, :3], k, v, 1.0, 0)
    with pytest.raises(ValueError, match="come together"):
        prefill.attention_lse(q, k, v, 1.0, 0, q_pe=pe["q_pe"])
    with pytest.raises(ValueError, match="contiguous"):
        prefill.attention_lse(q.transpose(0, 2).contiguous().transpose(0, 2), k, v, 1.0, 0)
    with pytest.raises(ValueError, match=r"k \("):
        prefill.attention_lse(q, k[:, :, :8], v, 1.0, 0)
    with pytest.raises(ValueError, match="power of two"):
        prefill.PrefillConfig(block_m=24)


def test_reference_merge_of_disjoint_key_sets():
    # merge_attention is exact: reference chunks merged equal the reference over all keys, and a set
    # nobody saw (lse -inf) leaves the other unchanged.
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(9, 4, 8, generator=g), torch.randn(30, 2, 8, generator=g), torch.randn(30, 2, 8, generator=g)
    whole = reference.attention_lse(q, k, v, 0.5, 21)
    a = reference.attention_lse(q, k[:13], v[:13], 0.5, 21)
    b = reference.attention_lse(q, k[13:], v[13:], 0.5, 21, 13)
    o, lse = reference.merge_attention(*a, *b)
    assert _rel(o, whole[0]) <= 1e-6 and (lse - whole[1]).abs().max().item() <= 1e-5
    none = reference.attention_lse(q, k[:5], v[:5], 0.5, 0, 40)  # keys after every query
    assert none[1].isinf().all() and (none[0] == 0).all()
    o2, lse2 = reference.merge_attention(*a, *none)
    assert torch.equal(o2, a[0]) and torch.equal(lse2, a[1])
