"""The engine call a CUDA stream runs (csrc/host_call.*, ops.cpu.host_call / Doorbell,
ops.cuda_host): same result as submit/wait, failures reported instead of thrown; the doorbell's
thread answers rings written into its mailbox (here by Python, as a stream's memory operation would);
and on a GPU (marked) the stream path of CpuExperts against the CPU path, through host functions and
through the doorbell, with the CPU work overlapping the GPU work queued between submit and wait."""

import os
import time
from contextlib import contextmanager

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


@pytest.mark.parametrize("isa", [None, pytest.param("amx", marks=pytest.mark.amx), "amx-emu"])
@pytest.mark.parametrize("nodes", [1, 2])
def test_a_run_call_joins_the_engines_workers(isa, nodes):
    """HostCall.run (a stream's doorbell) works on its job as one more worker of node 0: the same
    outputs as submit/wait, at one token (the decode flow) and at many (the prefill barriers, the
    matrix units' kernels on amx / amx-emu), on one node and on two; the joined caller takes tasks."""
    if isa is not None and (isa not in cpu.isa_info()["cpu"] or isa not in cpu.isa_info()["built"]):
        pytest.skip(f"{isa} is not available here")
    cpus = sorted(os.sched_getaffinity(0))
    if nodes == 2 and len(cpus) < 2:
        pytest.skip("needs two cpus to inject a two-node topology")
    topo = [cpus] if nodes == 1 else [cpus[:1], cpus[1:2]]
    eng = cpu.create_engine(nodes, numa_nodes=topo, isa=isa)
    g = torch.Generator().manual_seed(3)
    e, h, i = 16, 256, 128
    layer = cpu.add_layer(eng, "BF16", torch.randn(e, i, h, generator=g) / 8, torch.randn(e, i, h, generator=g) / 8,
                          torch.randn(e, h, i, generator=g) / 8)
    pool = eng.threads_per_node
    joined = 0
    for t in (1, 1, 1, 1, 200, 3, 1, 1, 1, 1):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(t, h, generator=g)
        ids = torch.randint(0, e, (t, 4), generator=g, dtype=torch.int32)
        ids[0, 0] = -1
        w = torch.rand(t, 4, generator=g)
        want = cpu.wait(eng, cpu.submit(eng, layer, x, ids, w))
        assert [len(n) for n in eng.last_tasks()] == pool  # the pools alone
        got = cpu.host_call(eng, layer, x, ids, w, torch.empty(t, h)).run()
        assert torch.equal(got, want), f"T={t}"
        tasks = eng.last_tasks()
        assert [len(n) for n in tasks] == [pool[0] + 1] + pool[1:]  # the caller last on node 0
        joined += tasks[0][-1]
    assert joined > 0


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


def ring(bell: cpu.Doorbell, v: int, timeout: float = 10.0) -> None:
    """What a stream does around one call: clear done, ring v, wait until done == v."""
    bell.mailbox[bell.DONE] = 0
    bell.mailbox[bell.RING] = v
    end = time.monotonic() + timeout
    while int(bell.mailbox[bell.DONE]) != v:
        assert time.monotonic() < end, f"the doorbell did not answer ring {v}"
        time.sleep(1e-4)
    assert int(bell.mailbox[bell.RING]) == 0  # taken


def test_doorbell_runs_the_rung_call(engine):
    eng, layer = engine
    bell = cpu.Doorbell(spin_us=1000)
    calls = [cpu.host_call(eng, layer, *inputs(t, seed=t), torch.empty(t, H)) for t in (5, 2)]
    assert [bell.number(c) for c in calls] == [1, 2] and bell.number(calls[0]) == 1
    for c in calls * 2:
        c.x.mul_(1.5)  # new inputs each time: the buffers are read when rung
        ring(bell, bell.number(c))
        assert torch.equal(c.out, cpu.wait(eng, cpu.submit(eng, layer, c.x, c.ids, c.w)))
    assert [c.calls for c in calls] == [2, 2] and bell.rings == 4
    launch_ns, done_ns = calls[1].engine_ns
    assert 0 < launch_ns <= done_ns <= time.monotonic_ns()
    time.sleep(0.05)  # past the spin: the thread naps, and still answers
    ring(bell, 1)
    assert calls[0].calls == 3


def test_doorbell_answers_failures_and_unknown_numbers(engine):
    eng, layer = engine
    bell = cpu.Doorbell(spin_us=1000)
    x, ids, w = inputs(3)
    call = cpu.host_call(eng, layer, x, ids, w, torch.empty(3, H))
    ids[1, 0] = E + 5
    ring(bell, bell.number(call))  # answered, so a waiting stream would go on
    assert "out of range" in call.error
    ring(bell, 7)  # no such call: answered, nothing run
    assert bell.unknown == 1 and bell.rings == 2 and call.calls == 1


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextmanager
def stream_calls(eng, mode: str):
    """The engine reached through host functions or through a doorbell, for one test."""
    from tandem.ops.cuda_host import device_pointer, stream_memops

    if mode == "doorbell":
        assert stream_memops() == "", stream_memops()
        eng.doorbell = cpu.Doorbell(device_pointer=device_pointer)
    try:
        yield
    finally:
        eng.doorbell = None


MODES = ["host_funcs", "doorbell"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_path_equals_cpu_path(engine, dtype, mode):
    eng, layer = engine
    experts = CpuExperts(eng, layer, ("BF16",) * 3)
    with stream_calls(eng, mode):
        for t in (1, 7, 40, 80, 7):  # new sizes, staging growth, copies past HOST_IO_MAX_TOKENS, a reused call
            x, ids, w = inputs(t, seed=t)
            want = experts.wait(experts.submit(x.to(dtype), ids, w))
            got = experts.wait(experts.submit(x.to(dtype).cuda(), ids.cuda().long(), w.cuda()))
            assert got.device.type == "cuda" and got.dtype == dtype
            assert torch.equal(got.cpu(), want)
        if mode == "doorbell":
            assert eng.doorbell.rings == 5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
def test_stream_path_overlaps_gpu_work_and_captures_in_a_graph(engine, mode):
    eng, layer = engine
    with stream_calls(eng, mode):
        stream_path_overlaps_and_captures(eng, layer, mode)


def stream_path_overlaps_and_captures(eng, layer, mode):
    experts = CpuExperts(eng, layer, ("BF16",) * 3)
    x, ids, w = (t.cuda() for t in inputs(4))
    experts.wait(experts.submit(x, ids, w))  # make the call and its buffers outside the graph
    torch.cuda.synchronize()

    def step():
        h = experts.submit(x, ids, w)
        torch.cuda._sleep(50_000_000)  # GPU busy (stands in for the shared experts) between submit and wait
        return experts.wait(h)

    t0 = time.monotonic_ns()
    want = step()
    torch.cuda.synchronize()
    t1 = time.monotonic_ns()
    call = next(iter(experts._calls.values()))
    submit_ns, wait_begin, wait_end = call.times_ns
    if mode == "host_funcs":
        # The CPU job ran while the GPU slept: by the time the stream reached wait the job was done,
        # so wait returned at once while the GPU had kept the stream busy since submit.
        assert wait_begin - submit_ns > 20 * (wait_end - wait_begin)
    else:
        # The doorbell's thread ran the job as soon as it was rung, in the first part of the step
        # (the GPU's sleep), not after it.
        assert t0 < submit_ns <= call.engine_ns[1] < t0 + (t1 - t0) // 2

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
