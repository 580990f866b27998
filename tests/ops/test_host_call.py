"""The engine call a CUDA stream runs as host functions (csrc/host_call.*, ops.cpu.host_call,
ops.cuda_host): same result as submit/wait, failures reported instead of thrown, and on a GPU
(marked) the stream path of CpuExperts against the CPU path, with the CPU work overlapping the
GPU work queued between submit and wait."""

import time

import pytest
import torch

from tandem.layers.cpu_experts import CpuExperts
from tandem.ops import cpu

E, H, I, K = 8, 64, 32, 2


@pytest.fixture(scope="module")
def engine():
    eng = cpu.create_engine(2)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(E, I, H, generator=g) / 8, torch.randn(E, I, H, generator=g) / 8, torch.randn(E, H, I, generator=g) / 8]
    return eng, cpu.add_layer(eng, "BF16", *w)


def inputs(t: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, H, generator=g), torch.randint(0, E, (t, K), generator=g, dtype=torch.int32),
            torch.rand(t, K, generator=g))


def test_host_call_equals_submit_wait(engine):
    eng, layer = engine
    x, ids, w = inputs(5)
    out = torch.empty(5, H)
    call = cpu.host_call(eng, layer, x, ids, w, out)
    want = cpu.wait(eng, cpu.submit(eng, layer, x, ids, w))
    assert torch.equal(call.run(), want)
    # The buffers are read at call time, not when the call was made.
    x2, ids2, w2 = inputs(5, seed=2)
    x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
    assert torch.equal(call.run(), cpu.wait(eng, cpu.submit(eng, layer, x2, ids2, w2)))
    assert call.calls == 2
    submit_ns, wait_begin, wait_end = call.times_ns
    assert 0 < submit_ns <= wait_begin <= wait_end <= time.monotonic_ns()
    launch_ns, done_ns = call.engine_ns  # the engine's side of the same job, inside submit .. wait
    assert submit_ns <= launch_ns <= done_ns <= wait_end
    assert all(a > 0 for a in call.addresses)


def test_host_call_failure_lands_in_error(engine):
    eng, layer = engine
    x, ids, w = inputs(3)
    call = cpu.host_call(eng, layer, x, ids, w, torch.empty(3, H))
    ids[1, 0] = E + 5
    with pytest.raises(RuntimeError, match="out of range"):
        call.run()
    call.clear_error()
    ids[1, 0] = 0
    call.run()
    assert call.error == ""


def test_host_call_checks_buffers(engine):
    eng, layer = engine
    x, ids, w = inputs(3)
    with pytest.raises(ValueError, match="do not fit"):
        cpu.host_call(eng, layer, x, ids, w, torch.empty(4, H))
    with pytest.raises(TypeError, match="int32"):
        cpu.host_call(eng, layer, x, ids.long(), w, torch.empty(3, H))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_path_equals_cpu_path(engine, dtype):
    eng, layer = engine
    experts = CpuExperts(eng, layer, ("BF16",) * 3)
    for t in (1, 7, 40, 7):  # new sizes, staging growth, a reused call
        x, ids, w = inputs(t, seed=t)
        want = experts.wait(experts.submit(x.to(dtype), ids, w))
        got = experts.wait(experts.submit(x.to(dtype).cuda(), ids.cuda().long(), w.cuda()))
        assert got.device.type == "cuda" and got.dtype == dtype
        assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@gpu
def test_stream_path_overlaps_gpu_work_and_captures_in_a_graph(engine):
    eng, layer = engine
    experts = CpuExperts(eng, layer, ("BF16",) * 3)
    x, ids, w = (t.cuda() for t in inputs(4))
    experts.wait(experts.submit(x, ids, w))  # make the call and its buffers outside the graph
    torch.cuda.synchronize()

    def step():
        h = experts.submit(x, ids, w)
        torch.cuda._sleep(50_000_000)  # GPU busy (stands in for the shared experts) between submit and wait
        return experts.wait(h)

    want = step()
    torch.cuda.synchronize()
    call = next(iter(experts._calls.values()))
    submit_ns, wait_begin, wait_end = call.times_ns
    # The CPU job ran while the GPU slept: by the time the stream reached wait the job was done,
    # so wait returned at once while the GPU had kept the stream busy since submit.
    assert wait_begin - submit_ns > 20 * (wait_end - wait_begin)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    calls = call.calls
    x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    assert call.calls == calls + 1 and not call.error
    assert torch.allclose(out.cpu(), CpuExperts(eng, layer, ("BF16",) * 3).wait(
        CpuExperts(eng, layer, ("BF16",) * 3).submit(x.cpu(), ids.cpu(), w.cpu())), atol=1e-6)
    assert not torch.equal(out.cpu(), want.cpu())
