"""Zero-copy staging kernels (tandem.ops.triton.host_io) against the copies they replace.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (the "pinned" buffers are
plain CPU tensors there); with CUDA, compiled, reading and writing pinned host memory from the
GPU. Both are pure moves and casts, so the bound is bit-equality with torch's copy_ / .to(), whose
rounding (to nearest even) the kernels share. Widths: V2-Lite's hidden size (2048) and V3's
(7168: two column passes of 4096), 1-16 tokens, k = 6 and 8.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from tandem.ops.triton import host_io

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.gpu if CUDA else []


def host(shape, dtype):
    return torch.full(shape, -7, dtype=dtype, pin_memory=CUDA)  # -7: a store that never happened shows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("n_tok, hidden, k", [(1, 2048, 6), (3, 7168, 8), (16, 2048, 6)])
def test_to_host_equals_the_copies(dtype, n_tok, hidden, k):
    g = torch.Generator().manual_seed(n_tok + hidden)
    x = torch.randn(n_tok, 2 * hidden, generator=g).to(dtype).to(DEVICE)[:, hidden:]  # a strided view
    ids = torch.randint(-1, 64, (n_tok, k), generator=g).to(DEVICE)  # int64, -1 padding
    w = torch.rand(n_tok, k, generator=g).to(DEVICE)
    staging = torch.float32 if dtype == torch.float16 else dtype  # what the engine takes
    bx, bids, bw = host((n_tok, hidden), staging), host((n_tok, k), torch.int32), host((n_tok, k), torch.float32)
    host_io.to_host(x, ids, w, bx, bids, bw)
    if CUDA:
        torch.cuda.synchronize()
    assert torch.equal(bx, x.cpu().to(staging))
    assert torch.equal(bids, ids.cpu().to(torch.int32))
    assert torch.equal(bw, w.cpu())


@pytest.mark.parametrize("src_dtype, dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                              (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("n_tok, hidden", [(1, 2048), (2, 7168), (16, 2048)])
def test_from_host_equals_copy_and_cast(src_dtype, dtype, n_tok, hidden):
    g = torch.Generator().manual_seed(n_tok * hidden)
    src = host((n_tok, hidden), src_dtype)
    src.copy_(torch.randn(n_tok, hidden, generator=g) * 3)
    src[0, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 65504.0])  # bf16 ties round to even
    got = host_io.from_host(src, dtype, torch.device(DEVICE))
    assert got.device.type == DEVICE and got.dtype == dtype
    assert torch.equal(got.cpu(), src.to(dtype))


@pytest.mark.parametrize("src_dtype, dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float32)])
@pytest.mark.parametrize("n_tok, hidden", [(1, 2048), (2, 7168)])
def test_from_host_adds_as_torch_adds(src_dtype, dtype, n_tok, hidden):
    """from_host(src, add=a) is bit-equal to src.to(dtype) + a: the cast rounds, then the sum does
    (the MoE block's routed + shared experts), on a strided view of a as well."""
    g = torch.Generator().manual_seed(hidden + n_tok)
    src = host((n_tok, hidden), src_dtype)
    src.copy_(torch.randn(n_tok, hidden, generator=g) * 3)
    add = (torch.randn(n_tok, 2 * hidden, generator=g) * 5).to(dtype).to(DEVICE)[:, :hidden]
    add[0, :3] = torch.tensor([2**-8, -(2**-8), 3 * 2**-8]).to(dtype)  # sums that land on bf16 ties
    src[0, :3] = 1.0
    got = host_io.from_host(src, dtype, torch.device(DEVICE), add)
    want = src.to(dtype).to(DEVICE) + add
    assert got.dtype == dtype and torch.equal(got.cpu(), want.cpu())
    with pytest.raises(ValueError, match="adds a"):
        host_io.from_host(src, dtype, torch.device(DEVICE), add[:, :64])


def test_from_host_reads_new_rows_each_call():
    src = host((1, 2048), torch.float32)
    src.fill_(1.0)
    first = host_io.from_host(src, torch.float32, torch.device(DEVICE))
    if CUDA:
        torch.cuda.synchronize()  # the launch is asynchronous: the first read must land before the rewrite
    src.fill_(2.0)  # the CPU rewrites the rows between two reads
    second = host_io.from_host(src, torch.float32, torch.device(DEVICE))
    assert float(first.sum()) == 2048 and float(second.sum()) == 4096


def test_rejects_bad_buffers():
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device=DEVICE)
    ids = torch.zeros(2, 6, dtype=torch.int32, device=DEVICE)
    w = torch.zeros(2, 6, device=DEVICE)
    bx, bids, bw = host((2, 64), torch.bfloat16), host((2, 6), torch.int32), host((2, 6), torch.float32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        host_io.to_host(x, ids, w, bx[:1], bids, bw)
    with pytest.raises(ValueError, match="int32 ids"):
        host_io.to_host(x, ids, w, bx, bids.long(), bw)
    with pytest.raises(ValueError, match="fp32/bf16"):
        host_io.from_host(torch.zeros(2, 64, dtype=torch.float16), torch.float32, torch.device(DEVICE))
    if CUDA:
        with pytest.raises(ValueError, match="pinned"):
            host_io.to_host(x, ids, w, torch.zeros(2, 64, dtype=torch.bfloat16), bids, bw)
