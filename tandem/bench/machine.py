"""Measure the machine in the same run as the engines: DRAM read, host->GPU copies, both at once, AMX.

DRAM read bandwidth comes from tandem._C's streaming-read probe (pinned threads, the best ISA's
loads over disjoint slices of one buffer); where the extension lacks it, a numpy fallback
(threads summing slices) stands in and says so, since it underestimates. The bounds take the best
reading of the run (`dram_read_gbs`): the probe at the engine's thread count, at every core, and
while H2D copies run. One reading alone can come out low: on the GPU machines the probe at 14
threads read 92-100 GB/s in runs where the same probe read 111-122 GB/s minutes later beside the
copies, and the engine itself streamed a V3 layer at 112 GB/s; on one box in session 16 nine
readings within two minutes spanned 93-151 GB/s. So `reprobe` reads once more after the engines
ran, and the bounds take the best of every reading of the run. Pinned H2D bandwidth is
timed with CUDA events. "Both at once": H2D copies are queued on the GPU first, then the CPU
probe runs while they drain; only the copies that finished while the CPU probe ran count.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

GB = 1e9


@dataclass
class Machine:
    threads: int
    cpu: str
    dram_read_gbs: float  # the best reading below: what the bounds use
    dram_probe: str
    dram_readings: dict[str, float] = field(default_factory=dict)  # "14 threads", "16 threads", "beside H2D"
    h2d_gbs: float | None = None
    both_cpu_gbs: float | None = None  # CPU read while H2D copies run
    both_h2d_gbs: float | None = None  # H2D while the CPU reads
    amx_int8_tops: float | None = None
    amx_bf16_tflops: float | None = None
    gpu: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_ops():
    """tandem.ops.cpu when the extension carries the probes, else None."""
    try:
        from tandem.ops import cpu

        cpu.isa_info()
        return cpu if hasattr(cpu, "stream_read_bandwidth") else None
    except (ImportError, AttributeError):
        return None


def numpy_read_bandwidth(nbytes: int, threads: int, rounds: int = 3) -> float:
    """GB/s of `threads` numpy threads summing disjoint slices of one buffer (best of `rounds`)."""
    buf = np.ones(max(threads, nbytes // 8), dtype=np.int64)  # written once: pages are real
    parts = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))  # numpy reductions release the GIL
            best = max(best, buf.nbytes / (time.perf_counter() - start) / GB)
    return best


def dram_read_bandwidth(nbytes: int, threads: int, rounds: int = 3) -> tuple[float, str]:
    """(GB/s, how it was measured)."""
    ops = _cpu_ops()
    if ops is not None:
        try:
            return ops.stream_read_bandwidth(nbytes, threads, rounds), "tandem._C stream_read_bandwidth"
        except (AttributeError, RuntimeError, ValueError):
            pass
    return numpy_read_bandwidth(nbytes, threads, rounds), "numpy threads (fallback: underestimates)"


def amx_peaks(threads: int, seconds: float = 0.2) -> tuple[float | None, float | None]:
    """(INT8 TOP/s, BF16 TFLOP/s) of AMX tile products on registers; (None, None) without AMX."""
    ops = _cpu_ops()
    if ops is None or not hasattr(ops, "amx_peak"):
        return None, None
    try:
        return ops.amx_peak("int8", threads, seconds), ops.amx_peak("bf16", threads, seconds)
    except (RuntimeError, ValueError):
        return None, None


def h2d_bandwidth(nbytes: int, rounds: int = 5) -> float:
    """GB/s of pinned host -> GPU copies of `nbytes` (CUDA events, after one warm-up copy)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return nbytes * rounds / (start.elapsed_time(end) / 1e3) / GB


def both_at_once(cpu_bytes: int, threads: int, h2d_alone: float, cpu_alone: float,
                 chunk: int = 256 << 20) -> tuple[float, float]:
    """(CPU read GB/s, H2D GB/s) while both run: copies queued first, then the CPU probe."""
    rounds = 3
    cpu_seconds = rounds * cpu_bytes / (cpu_alone * GB)
    n_copies = int(min(400, max(4, 1.5 * cpu_seconds * h2d_alone * GB / chunk)))
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n_copies + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for ev in events[1:]:
        dev.copy_(host, non_blocking=True)
        ev.record()
    t0 = time.perf_counter()
    cpu_gbs, _ = dram_read_bandwidth(cpu_bytes, threads, rounds)
    probe_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    ends = [events[0].elapsed_time(ev) / 1e3 for ev in events[1:]]
    inside = [t for t in ends if t <= 0.95 * probe_s] or ends[:1]
    return cpu_gbs, len(inside) * chunk / inside[-1] / GB


def measure_machine(threads: int | None = None, bw_bytes: int = 4 << 30, cuda: bool | None = None,
                    log=print, amx_seconds: float = 0.2) -> Machine:
    """Every probe this machine supports, logged as it goes."""
    cores = len(os.sched_getaffinity(0))
    threads = threads or cores
    cuda = torch.cuda.is_available() if cuda is None else cuda
    bw, how = dram_read_bandwidth(bw_bytes, threads)
    m = Machine(threads, cpu_name(), bw, how, {f"{threads} threads": bw})
    log(f"DRAM read bandwidth, {threads} threads, {bw_bytes / 2**30:.1f} GiB: {bw:.1f} GB/s ({how})")
    if cores > threads:
        m.dram_readings[f"{cores} threads"], _ = dram_read_bandwidth(bw_bytes, cores)
        log(f"DRAM read bandwidth, {cores} threads: {m.dram_readings[f'{cores} threads']:.1f} GB/s")
    if how.startswith("numpy"):
        m.notes.append("DRAM bandwidth from the numpy fallback: it underestimates, so bounds are low")
    m.amx_int8_tops, m.amx_bf16_tflops = amx_peaks(threads, amx_seconds)
    if m.amx_int8_tops is not None:
        log(f"AMX peak: INT8 {m.amx_int8_tops:.1f} TOP/s, BF16 {m.amx_bf16_tflops:.1f} TFLOP/s")
    else:
        m.notes.append("no AMX peak (CPU or build without AMX): prefill bounds count bandwidth only")
    if cuda:
        m.gpu = torch.cuda.get_device_name()
        m.h2d_gbs = h2d_bandwidth(min(bw_bytes, 1 << 30))
        log(f"pinned host->GPU copy ({m.gpu}): {m.h2d_gbs:.1f} GB/s")
        m.both_cpu_gbs, m.both_h2d_gbs = both_at_once(bw_bytes, threads, m.h2d_gbs, bw)
        m.dram_readings["beside H2D"] = m.both_cpu_gbs
        log(f"both at once: CPU read {m.both_cpu_gbs:.1f} GB/s while H2D holds {m.both_h2d_gbs:.1f} GB/s")
    m.dram_read_gbs = max(m.dram_readings.values())
    if len(m.dram_readings) > 1:
        log(f"DRAM read bandwidth for the bounds: {m.dram_read_gbs:.1f} GB/s (the best reading)")
    return m


def reprobe(m: Machine, bw_bytes: int, label: str, log=print) -> bool:
    """One more DRAM reading at the run's thread count, kept as `label`; the bounds' figure becomes
    the best of every reading so far. True when it rose (the caller recomputes its bounds)."""
    before = m.dram_read_gbs
    m.dram_readings[label], _ = dram_read_bandwidth(bw_bytes, m.threads)
    m.dram_read_gbs = max(m.dram_readings.values())
    log(f"DRAM read bandwidth, {m.threads} threads, {label}: {m.dram_readings[label]:.1f} GB/s; "
        f"for the bounds: {m.dram_read_gbs:.1f} GB/s (the best reading of the run)")
    return m.dram_read_gbs > before
