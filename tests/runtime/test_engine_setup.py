"""How the runtime sets up the CPU engine: how long idle workers spin (long with a GPU: a job
waits for every worker, and waking sleeping ones is slow; short on a CPU-only run; TANDEM_SPIN_US
overrides both), how many workers (every usable core, all but GPU_FREE_CORES with a GPU, or the
count asked for) and how a GPU stream reaches it (a doorbell, or host functions when the driver
cannot write and wait on host memory)."""

import os

import pytest

from tandem.errors import TandemError
from tandem.ops import cpu, cuda_host
from tandem.runtime.experts import GPU_FREE_CORES, GPU_SPIN_US, SPIN_US, create_cpu_engine, spin_us


def test_spin_defaults_and_override(monkeypatch):
    monkeypatch.delenv("TANDEM_SPIN_US", raising=False)
    assert spin_us(gpu=True) == GPU_SPIN_US > SPIN_US == spin_us(gpu=False)
    monkeypatch.setenv("TANDEM_SPIN_US", "250")
    assert spin_us(gpu=True) == spin_us(gpu=False) == 250
    monkeypatch.setenv("TANDEM_SPIN_US", "-1")
    with pytest.raises(TandemError, match="TANDEM_SPIN_US"):
        spin_us(gpu=False)


@pytest.mark.parametrize("memops", ["", "no stream memory operations here"])
def test_engine_threads_and_doorbell(monkeypatch, capsys, memops):
    started = []

    def fake_create(threads, spin_us):
        started.append((threads, spin_us))
        return cpu.Engine(native=None, nodes=[[0]])

    monkeypatch.setattr(cpu, "create_engine", fake_create)
    monkeypatch.setattr(cuda_host, "stream_memops", lambda: memops)
    monkeypatch.setattr(cuda_host, "device_pointer", lambda address: address + 1)
    monkeypatch.delenv("TANDEM_SPIN_US", raising=False)
    cores = len(os.sched_getaffinity(0))

    assert create_cpu_engine(None, gpu=False).doorbell is None
    gpu_engine = create_cpu_engine(None, gpu=True)
    assert create_cpu_engine(3, gpu=True) is not None
    assert started == [(None, SPIN_US), (max(1, cores - GPU_FREE_CORES), GPU_SPIN_US), (3, GPU_SPIN_US)]
    if memops:
        assert gpu_engine.doorbell is None and memops in capsys.readouterr().err
    else:
        bell = gpu_engine.doorbell
        assert bell.device_words == (bell.address(bell.RING) + 1, bell.address(bell.DONE) + 1)


def test_warns_when_gpu_run_threads_take_the_free_cores(monkeypatch, caplog):
    # 16 expert threads on a 16-core GPU box decoded 6x slower than 14 (the doorbell and the thread
    # driving the GPU lost their cores): asking for that is allowed, with a warning.
    from tandem.ops import cpu
    from tandem.runtime import experts

    monkeypatch.setattr(cpu, "create_engine", lambda threads, spin_us: cpu.Engine(native=None, nodes=[[0]]))
    monkeypatch.setattr(experts.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("tandem.ops.cuda_host.stream_memops", lambda: "none here")
    with caplog.at_level("WARNING"):
        create_cpu_engine(14, gpu=True)
        create_cpu_engine(16, gpu=False)
    assert "leave fewer than" not in caplog.text
    with caplog.at_level("WARNING"):
        create_cpu_engine(16, gpu=True)
    assert "16 CPU expert threads on 16 cores leave fewer than 2" in caplog.text and "14 threads" in caplog.text
