"""Host functions on a CUDA stream, through the driver's cuLaunchHostFunc (ctypes, no build-time
CUDA dependency). The CPU expert engine's submit and wait run this way, in stream order, so a
decode step with CPU work in it can be captured in one CUDA graph (host nodes).

The driver library is loaded on first use, never at import.
"""

import ctypes
import functools

import torch


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"cannot load the CUDA driver (libcuda.so.1) for host functions: {e}") from None
    lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuLaunchHostFunc.restype = ctypes.c_int
    return lib


def launch_host_func(fn: int, ctx: int, stream: torch.cuda.Stream | None = None) -> None:
    """Enqueue fn(ctx) on `stream` (default: the current one): it runs on a driver thread after the
    work queued before it and before the work queued after it. fn must not call CUDA."""
    s = torch.cuda.current_stream() if stream is None else stream
    err = _driver().cuLaunchHostFunc(ctypes.c_void_p(s.cuda_stream), ctypes.c_void_p(fn), ctypes.c_void_p(ctx))
    if err != 0:
        raise RuntimeError(f"cuLaunchHostFunc failed with CUDA error {err}")


CU_CTX_SCHED_BLOCKING_SYNC = 0x4


def use_blocking_sync(index: int = 0) -> bool:
    """Make threads that wait for GPU `index` sleep instead of spinning (the primary context's
    scheduling flag; takes effect for a context created afterwards). With the CPU experts' worker
    threads on every core, a spinning waiter takes a core from them and from the driver thread that
    runs the host functions. Returns whether the driver accepted it."""
    lib = _driver()
    dev = ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(dev), int(index)) != 0:
        return False
    return lib.cuDevicePrimaryCtxSetFlags_v2(dev, CU_CTX_SCHED_BLOCKING_SYNC) == 0
