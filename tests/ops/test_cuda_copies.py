"""Many host -> device copies in one driver call (ops.cuda_host.copy_batch, the dual path's expert
copies): every range lands where asked, through cuMemcpyBatchAsync and through the one-copy-each
fallback a driver without it (or refusing it) takes; in stream order behind the work queued before.
GPU only (marked)."""

import numpy as np
import pytest
import torch

from tandem.ops import cuda_host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def locked():
    """8 MiB of page-locked host memory the test owns (registered like the engine's slabs)."""
    torch.zeros(1, device="cuda")  # the driver calls need torch's CUDA context current (else error 201)
    host = np.random.default_rng(0).integers(0, 256, size=8 << 20, dtype=np.uint8)
    cuda_host.register_host(host.ctypes.data, host.nbytes)
    yield host
    torch.cuda.synchronize()
    cuda_host.unregister_host(host.ctypes.data)


@pytest.mark.parametrize("how", ["batch", "each"])
def test_copy_batch_lands_every_range(locked, monkeypatch, how):
    if how == "each":
        monkeypatch.setitem(cuda_host._BATCH, "refused", 801)  # as after a driver's refusal
    elif cuda_host._copy_functions()[0] is None:
        pytest.skip("this driver has no cuMemcpyBatchAsync")
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 200_000, size=64)
    sources = rng.integers(0, locked.nbytes - sizes.max(), size=64)
    into = torch.full((int(sizes.sum()) + 4096,), 7, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        into.fill_(3)  # queued before the copies: they must land after it
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    copies = [(into.data_ptr() + int(o), locked.ctypes.data + int(s), int(n)) for o, s, n in zip(offsets, sources, sizes)]
    assert cuda_host.copy_batch(copies, stream) == how
    stream.synchronize()
    got = into.cpu().numpy()
    want = np.concatenate([locked[s : s + n] for s, n in zip(sources, sizes)])
    assert np.array_equal(got[: want.size], want)
    assert (got[want.size :] == 3).all()  # nothing past the last range
    assert cuda_host.copy_batch([], stream) == "batch"
