"""Host functions and stream memory operations on a CUDA stream, through the driver (ctypes, no
build-time CUDA dependency). The CPU expert engine's calls run in stream order one of two ways, both
of which a CUDA graph captures:
- host functions (cuLaunchHostFunc): the stream blocks while a driver thread runs the engine's
  submit, and again in its wait;
- a doorbell (ops.cpu.Doorbell): the stream writes a word in pinned memory (cuStreamWriteValue32)
  that the engine's own thread watches, and later waits until another word holds the answer
  (cuStreamWaitValue32). Nothing blocks on a driver thread; `stream_memops()` says whether the
  driver does this.
Also: page-locking memory the caller owns (register_host) and many copies in one driver call
(copy_batch: the dual path's expert copies).

The driver library is loaded on first use, never at import.
"""

import ctypes
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"cannot load the CUDA driver (libcuda.so.1) for host functions: {e}") from None
    lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuLaunchHostFunc.restype = ctypes.c_int
    lib.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    lib.cuMemHostGetDevicePointer_v2.restype = ctypes.c_int
    for name in ("cuStreamWriteValue32_v2", "cuStreamWaitValue32_v2"):
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            fn.restype = ctypes.c_int
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


CU_STREAM_WAIT_VALUE_EQ = 0x1


def device_pointer(host_address: int) -> int:
    """The device address of pinned, mapped host memory (cudaHostAlloc's, so torch's pin_memory:
    with unified addressing it is mapped), for stream memory operations."""
    out = ctypes.c_uint64()
    err = _driver().cuMemHostGetDevicePointer_v2(ctypes.byref(out), ctypes.c_void_p(host_address), 0)
    if err != 0:
        raise RuntimeError(f"cuMemHostGetDevicePointer failed with CUDA error {err}: the memory is not pinned and mapped")
    return out.value


def write_value(device_address: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """Enqueue: *address = value (32 bits) once the work queued before it is done and visible."""
    s = torch.cuda.current_stream() if stream is None else stream
    err = _driver().cuStreamWriteValue32_v2(ctypes.c_void_p(s.cuda_stream), device_address, value, 0)
    if err != 0:
        raise RuntimeError(f"cuStreamWriteValue32 failed with CUDA error {err}")


def wait_value(device_address: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """Enqueue: the work queued after this waits until *address == value (32 bits)."""
    s = torch.cuda.current_stream() if stream is None else stream
    err = _driver().cuStreamWaitValue32_v2(ctypes.c_void_p(s.cuda_stream), device_address, value, CU_STREAM_WAIT_VALUE_EQ)
    if err != 0:
        raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA error {err}")


@functools.cache
def stream_memops() -> str:
    """'' when this driver writes and waits on pinned host words from a stream (tried once on a
    scratch word), else why not: the CPU experts then use host functions."""
    if os.environ.get("TANDEM_HOST_FUNCS"):
        return "TANDEM_HOST_FUNCS is set"
    try:
        lib = _driver()
        if not hasattr(lib, "cuStreamWriteValue32_v2") or not hasattr(lib, "cuStreamWaitValue32_v2"):
            return "the driver has no cuStreamWriteValue32_v2 / cuStreamWaitValue32_v2"
        word = torch.zeros(2, dtype=torch.int32, pin_memory=True)
        addr = device_pointer(word.data_ptr())
        stream = torch.cuda.Stream()
        write_value(addr, 7, stream)
        wait_value(addr, 7, stream)  # already true once the write landed: cannot hang
        write_value(addr + 4, 9, stream)
        stream.synchronize()
        if word.tolist() != [7, 9]:
            return f"the stream's writes did not land in host memory (read {word.tolist()})"
    except RuntimeError as e:
        return str(e)
    return ""


def register_host(host_address: int, nbytes: int) -> None:
    """Page-lock host memory the caller keeps (cuMemHostRegister), so copies from it to a GPU are
    asynchronous DMA at the link's speed. The caller must unregister_host it before the memory is
    freed: a registration outliving its memory keeps the old pages pinned, and later memory at
    those addresses is copied from the old pages."""
    lib = _driver()
    lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    err = lib.cuMemHostRegister_v2(ctypes.c_void_p(host_address), ctypes.c_size_t(nbytes), 0)
    if err == 712:  # CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED: a registration nobody undid
        raise RuntimeError("cuMemHostRegister: the range is already registered (stale registration?)")
    if err != 0:
        raise RuntimeError(f"cuMemHostRegister failed with CUDA error {err}")


def unregister_host(host_address: int) -> None:
    """Undo register_host(host_address, ...); quiet when it is not registered or CUDA is shut down."""
    lib = _driver()
    lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
    err = lib.cuMemHostUnregister(ctypes.c_void_p(host_address))
    if err not in (0, 4, 713):  # 4: CUDA_ERROR_DEINITIALIZED, 713: CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED
        raise RuntimeError(f"cuMemHostUnregister failed with CUDA error {err}")


class _MemLocation(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _CopyAttributes(ctypes.Structure):  # CUmemcpyAttributes (CUDA >= 12.8)
    _fields_ = [("src_access_order", ctypes.c_int), ("src_loc_hint", _MemLocation),
                ("dst_loc_hint", _MemLocation), ("flags", ctypes.c_uint)]


CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1
CU_MEM_LOCATION_TYPE_DEVICE, CU_MEM_LOCATION_TYPE_HOST = 1, 2
_BATCH = {"refused": 0}  # the batched call's CUDA error once it failed (0: not tried or worked)


@functools.cache
def _copy_functions():
    """(cuMemcpyBatchAsync and whether it takes the 12.x failIdx argument, or None; cuMemcpyAsync)."""
    lib = _driver()
    lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    lib.cuMemcpyAsync.restype = ctypes.c_int
    batch = None
    arrays = [ctypes.c_void_p] * 3 + [ctypes.c_size_t, ctypes.POINTER(_CopyAttributes), ctypes.c_void_p, ctypes.c_size_t]
    if hasattr(lib, "cuMemcpyBatchAsync_v2"):  # CUDA 13: no failIdx
        batch = (lib.cuMemcpyBatchAsync_v2, False)
        batch[0].argtypes = arrays + [ctypes.c_void_p]
    elif hasattr(lib, "cuMemcpyBatchAsync"):  # CUDA 12.8-12.9
        batch = (lib.cuMemcpyBatchAsync, True)
        batch[0].argtypes = arrays + [ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
    if batch is not None:
        batch[0].restype = ctypes.c_int
    return batch, lib.cuMemcpyAsync


def copy_batch(copies: list[tuple[int, int, int]], stream: torch.cuda.Stream) -> str:
    """Enqueue copies (destination, source, bytes) from page-locked host memory to `stream`'s
    device, in stream order, with one driver call (cuMemcpyBatchAsync, CUDA >= 12.8) where the
    driver has it, else one cuMemcpyAsync each: either way without torch's per-copy overhead
    (~20-40 us a copy_ through the dispatcher against a few us here). The source memory must stay
    until the copies ran. Returns how they were issued ("batch" or "each")."""
    if not copies:
        return "batch"
    batch, each = _copy_functions()
    handle = ctypes.c_void_p(stream.cuda_stream)
    if batch is not None and not _BATCH["refused"]:
        n = len(copies)
        dsts, srcs, sizes = ((ctypes.c_uint64 * n)(*c) for c in zip(*copies))
        attrs = _CopyAttributes(CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, _MemLocation(CU_MEM_LOCATION_TYPE_HOST, 0),
                                _MemLocation(CU_MEM_LOCATION_TYPE_DEVICE, stream.device.index or 0), 0)
        first = (ctypes.c_size_t * 1)(0)
        args = [dsts, srcs, sizes, n, ctypes.byref(attrs), first, 1]
        if batch[1]:
            args.append(ctypes.byref(ctypes.c_size_t(0)))
        err = batch[0](*args, handle)
        if err == 0:
            return "batch"
        _BATCH["refused"] = err  # e.g. an older driver's CUDA_ERROR_NOT_SUPPORTED: each copy on its own from now on
        log.warning("cuMemcpyBatchAsync failed with CUDA error %d: copies go out one call each from now on", err)
    for dst, src, size in copies:
        err = each(dst, src, size, handle)
        if err != 0:
            raise RuntimeError(f"cuMemcpyAsync failed with CUDA error {err}")
    return "each"
