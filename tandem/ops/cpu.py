"""The CPU expert engine: routed experts kept in CPU RAM and computed by the C++ extension.

This is the only module that imports `tandem._C`, lazily on first use. Data path of one layer:

    engine = create_engine()                              # at load: pools per NUMA node
    layer = add_layer(engine, "Q4_K", gate, up, down)     # at load: repack / quantize once
    h = submit(engine, layer, x, ids, w)                  # returns at once; the pools compute
    ...                                                   # the GPU overlaps (shared experts)
    out = wait(engine, h)                                 # [T, H]

out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j]; ids == -1 is
skipped. The Engine object is owned by the runtime; these functions take it as an argument.
Weight formats (see csrc/quant/): BF16, INT8 (per-row symmetric), INT4 (symmetric, groups of 64
along K) are quantized at load from float32/bfloat16 tensors [E, I, H] / [E, H, I]; the GGUF
formats Q8_0, Q5_0, Q4_K, Q5_K, Q6_K take the file's raw blocks as uint8 [E, rows, row_bytes].
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tandem.ops.cpu_topology import check_nodes, default_nodes, split_threads

_FLOATS = (torch.float32, torch.bfloat16)
# The C types the extension's functions take for counts and ids: nanobind refuses a Python int
# outside them with a generic "incompatible function arguments" that names no argument.
INT_MAX = 2**31 - 1
SIZE_MAX = 2**64 - 1  # size_t, uint64_t (tickets)


@functools.cache
def _ext():
    # By name: a static `from tandem import _C` reads to import-linter as importing the tandem
    # package (and so everything its __init__ imports); the extension itself imports nothing.
    return importlib.import_module("tandem._C")


def formats() -> dict[str, dict]:
    """Format name -> {block_elems, block_bytes, row_header, online} as the C++ side declares it."""
    return _ext().formats()


def block_sizes() -> dict[str, tuple[int, int]]:
    """Format name -> (weights per block, bytes per block), the C++ block structs' sizes."""
    return _ext().block_sizes()


def isa_info() -> dict[str, list[str]]:
    """ISA levels this CPU supports and those this build has kernels for (TANDEM_ISA overrides)."""
    return _ext().isa_info()


def stream_read_bandwidth(nbytes: int, threads: int, rounds: int = 5, streams: int = 0) -> float:
    """GB/s of `threads` pinned threads streaming disjoint slices of an `nbytes` buffer with the
    best ISA's loads (best of `rounds`; `streams` side-by-side streams per thread, 0 = the best of
    1, 2 and 4): the DRAM read bandwidth the engine should approach."""
    return _ext().stream_read_bandwidth(_c_int(nbytes, "nbytes", 1, SIZE_MAX), _c_int(threads, "threads", 1),
                                        _c_int(rounds, "rounds", 1), _c_int(streams, "streams", 0, 64))


def amx_peak(dtype: str, threads: int, seconds: float = 0.2) -> float | None:
    """TOP/s ("int8") or TFLOP/s ("bf16") of tile dot products on registers, or None without AMX."""
    if dtype not in ("int8", "bf16"):
        raise ValueError(f"dtype must be 'int8' or 'bf16'; got {dtype!r}")
    threads = _c_int(threads, "threads", 1)  # checked on every CPU, AMX or not
    if "amx" not in isa_info()["cpu"] or "amx" not in isa_info()["built"]:
        return None
    return _ext().amx_peak(dtype == "bf16", threads, float(seconds))


PHASES = ("prep_x", "gate_up", "prep_h", "down", "done")  # an engine job's phases (last_phases)


class Engine:
    """Owns one C++ engine: a thread pool per NUMA node, the layers' weights, staging buffers."""

    def __init__(self, native, nodes: list[list[int]]):
        self._native = native
        self.nodes = nodes
        self._lock = threading.Lock()
        # Outputs of submitted jobs that may still be written: kept alive until their job is done.
        self._pending: dict[int, torch.Tensor] = {}
        # Pinned staging buffers the layers of a GPU model share (layers.cpu_experts), by shape key.
        self.staging: dict = {}
        # Set by the runtime on GPU runs whose driver has stream memory operations: the layers'
        # stream calls then ring it instead of running host functions.
        self.doorbell: Doorbell | None = None

    @property
    def threads_per_node(self) -> list[int]:
        return list(self._native.threads_per_node)

    @property
    def n_threads(self) -> int:
        return sum(self.threads_per_node)

    @property
    def isa(self) -> str:
        return self._native.isa

    @property
    def pinned(self) -> bool:
        return self._native.pinned

    @property
    def prefill_rows(self) -> int:
        """Rows of one expert projection per task for the prefill (`big`) kernels: 0 = automatic
        (64-256: as many as keep >= 4 tasks per worker), else a multiple of 64 up to 1024."""
        return self._native.prefill_rows

    @prefill_rows.setter
    def prefill_rows(self, rows: int) -> None:
        self._native.prefill_rows = _c_int(rows, "prefill_rows", 0, 1024)  # the engine checks the multiple of 64

    def kernel_info(self) -> dict:
        """Format -> {path, act, row_group[, big_path, big_act, big_min]}: the kernels this engine
        runs for each weight format (big_*: the prefill kernel, used from big_min tokens/expert)."""
        return self._native.kernel_info()

    def last_phases(self) -> dict[str, float]:
        """ms after launch at which the last finished job left each phase (any worker's latest):
        prep_x (activations), gate_up, prep_h, down, done. For tuning; call after wait()."""
        return dict(zip(PHASES, self._native.last_phases()))

    def last_phase_spread(self) -> dict[str, tuple[float, float]]:
        """Per phase, (first, last) ms after launch at which a worker left it in the last finished
        job: last - first is how long the earliest worker waited at that phase's barrier."""
        return dict(zip(PHASES, zip(self._native.last_phases_first(), self._native.last_phases())))

    def last_tasks(self) -> list[list[int]]:
        """Tasks each worker took in the last finished job, per NUMA node; a caller that joined
        the job (`HostCall.run`, a stream's doorbell) is node 0's last entry. For tests and tuning;
        call after wait()."""
        return self._native.last_tasks()

    def layer_info(self, layer: int) -> dict:
        """experts, hidden, intermediate, formats, bytes (weights held) and each node's I slice."""
        return self._native.layer_info(_check_layer(self, layer))

    def __repr__(self) -> str:
        return f"Engine(isa={self.isa}, threads_per_node={self.threads_per_node}, layers={self._native.n_layers})"


@dataclass(frozen=True, eq=False)
class Handle:
    """A submitted job; pass it to wait()."""

    engine: Engine
    ticket: int
    out: torch.Tensor


MAX_THREADS_PER_CORE = 4  # create_engine refuses more workers than this per usable core


def create_engine(
    n_threads: int | None = None,
    numa_nodes: list[list[int]] | None = None,
    *,
    spin_us: int = 1000,
    isa: str | None = None,
) -> Engine:
    """Start the engine's worker threads, pinned to cores.

    n_threads: total workers, split over NUMA nodes in proportion to their cores (default: the
    cores this process may run on). numa_nodes: cpu ids per node, to inject a topology (tests run
    the multi-node path on one node this way); default: the machine's nodes from sysfs.
    spin_us: how long idle workers spin before sleeping (latency of the next submit vs. cpu time
    taken from other threads, e.g. the one driving the GPU).
    isa: the kernels to use ("generic", "avx2", "avx512", "amx", or "amx-emu": the AMX kernels
    on software tiles, slow, for testing them on AVX-512 CPUs); default: the best this CPU runs,
    or the TANDEM_ISA environment variable (a debugging override). Raises ValueError when the
    build or the CPU lacks it.
    """
    allowed = sorted(os.sched_getaffinity(0))
    nodes = default_nodes(allowed) if numa_nodes is None else check_nodes(numa_nodes, allowed)
    if n_threads is None:
        n_threads = sum(len(n) for n in nodes)
    if not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < len(nodes):
        raise ValueError(f"n_threads must be an int >= the number of NUMA nodes ({len(nodes)}); got {n_threads!r}")
    cores = sum(len(n) for n in nodes)
    if n_threads > MAX_THREADS_PER_CORE * cores:
        raise ValueError(f"n_threads={n_threads} is more than {MAX_THREADS_PER_CORE} per core of the {cores} this "
                         "engine may use: more workers than cores only take turns")
    if not isinstance(spin_us, int) or isinstance(spin_us, bool) or not 0 <= spin_us <= 10**7:
        raise ValueError(f"spin_us must be an int in [0, 10**7]; got {spin_us!r}")
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"isa must be a string; got {type(isa).__name__}")
    threads = split_threads(n_threads, [len(n) for n in nodes])
    return Engine(_ext().Engine(nodes, threads, spin_us, isa or ""), nodes)


def add_layer(
    engine: Engine,
    fmt: str | Sequence[str],
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    prequantized: bool = False,
) -> int:
    """Load one layer's routed experts; returns its id for submit().

    fmt: one format for all three projections, or (gate, up, down) formats, e.g. a Q4_K_M file's
    ("Q4_K", "Q4_K", "Q6_K"). gate/up are [E, I, H] and down [E, H, I] float32/bfloat16 for
    BF16/INT8/INT4; raw GGUF blocks are uint8 [E, rows, row_bytes] (torch or numpy).
    prequantized: BF16/INT8/INT4 rows already in the format's row layout (csrc/quant/*.h) as
    uint8 [E, rows, row_bytes], e.g. a benchmark's random rows; nothing is quantized.
    """
    if not isinstance(prequantized, bool):
        raise TypeError(f"prequantized must be True or False; got {prequantized!r}")
    fmts = _formats_of(fmt)
    known = formats()
    args = []
    for name, f, t in zip(("gate", "up", "down"), fmts, (gate, up, down)):
        args += [f, _weight(t, name, f, known[f]["online"] and not prequantized, known[f]["online"])]
    return engine._native.add_layer(*args, prequantized=bool(prequantized))


def submit(
    engine: Engine,
    layer: int,
    x: torch.Tensor,
    ids: torch.Tensor,
    w: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> Handle:
    """Start one layer's experts on the engine's pools and return at once.

    x [T, H] float32/bfloat16, ids [T, k] int32 (-1 = no expert), w [T, k] float32, all on the CPU.
    They are copied into the engine's staging buffers, so the caller may reuse them at once.
    The result is out_dtype (default x.dtype), written into `out` when given.
    """
    _check_tensor(x, "x", _FLOATS, 2)
    _check_tensor(ids, "ids", (torch.int32,), 2, hint="use ids.to(torch.int32)")
    _check_tensor(w, "w", (torch.float32,), 2, hint="use w.float()")
    if out is None:
        out_dtype = x.dtype if out_dtype is None else out_dtype
        if out_dtype not in _FLOATS:
            raise TypeError(f"out_dtype must be torch.float32 or torch.bfloat16; got {out_dtype}")
        out = torch.empty(x.shape, dtype=out_dtype)
    else:
        _check_tensor(out, "out", _FLOATS, 2)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    ticket = engine._native.submit(_check_layer(engine, layer), x.contiguous(), ids.contiguous(), w.contiguous(), out)
    with engine._lock:
        done = engine._native.completed()
        for t in [t for t in engine._pending if t <= done]:
            del engine._pending[t]
        engine._pending[ticket] = out
    return Handle(engine, ticket, out)


def wait(engine: Engine, handle: Handle) -> torch.Tensor:
    """Block (without the GIL) until the job is done; returns its output [T, H]."""
    if not isinstance(handle, Handle):
        raise TypeError(f"wait() takes the Handle that submit() returned; got {type(handle).__name__}")
    if handle.engine is not engine:
        raise ValueError("this handle was returned by another engine's submit()")
    engine._native.wait(_c_int(handle.ticket, "handle.ticket", 0, SIZE_MAX))
    with engine._lock:
        engine._pending.pop(handle.ticket, None)
    return handle.out


@dataclass(frozen=True, eq=False)
class HostCall:
    """One layer's engine call on fixed buffers, for a CUDA stream to run as host functions.

    `submit_fn`, `wait_fn` and `ctx` are the addresses cuLaunchHostFunc takes (ops.cuda_host);
    the stream's own copies fill x/ids/w before submit runs and read out after wait. A failure
    inside a host function cannot raise: it lands in `error`, which the caller checks.
    """

    native: object
    x: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    out: torch.Tensor

    addresses: tuple[int, int, int]  # (submit_fn, wait_fn, ctx) from the 'tandem.host_fns' capsule
    layout: tuple = ()  # (data_ptr, shape) of x, ids, w, out when the call was made

    @property
    def error(self) -> str:
        return self.native.error

    @property
    def calls(self) -> int:
        return self.native.calls

    @property
    def times_ns(self) -> tuple[int, int, int]:
        """steady-clock ns (time.monotonic_ns's clock on Linux) of the last submit, of entering
        the last wait and of leaving it: wait entered after the job ended means the CPU work
        overlapped whatever the stream ran between them."""
        return tuple(self.native.times_ns)

    @property
    def engine_ns(self) -> tuple[int, int]:
        """steady-clock ns of the same job's launch by the engine (after staging its inputs) and
        of its end (the last worker done), as the last wait saw them."""
        return tuple(self.native.engine_ns)

    def clear_error(self) -> None:
        self.native.clear_error()

    def _check_buffers(self) -> None:
        """The call holds the buffers' addresses from when it was made: a buffer resized (or
        swapped) in place since would be read and written at freed memory."""
        for name, t, (ptr, shape) in zip(("x", "ids", "w", "out"), (self.x, self.ids, self.w, self.out),
                                         self.layout):
            if t.data_ptr() != ptr or tuple(t.shape) != shape:
                raise ValueError(f"host_call buffer {name} moved or changed shape since the call was made "
                                 f"({list(shape)} -> {list(t.shape)}): make a new host_call")

    def run(self) -> torch.Tensor:
        """Submit and wait on this thread as a stream's doorbell does (work on the job as one more
        of the engine's workers, spin for the rest, then poll; never a sleep on the engine's
        condition variable, whose wake-up a stream does not pay);
        returns out. (Stream calls keep a failure in `error` until it is cleared, so replayed graphs
        cannot lose it; a call run here reports its own.)"""
        self._check_buffers()
        self.native.clear_error()
        self.native.run()
        if self.error:
            raise RuntimeError(f"CPU experts call failed: {self.error}")
        return self.out


def host_call(engine: Engine, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
              out: torch.Tensor) -> HostCall:
    """A call of `layer` on these buffers (CPU, contiguous; pinned when a GPU copies into them),
    to run later from a CUDA stream; the buffers are checked now and must live as long as it."""
    _check_tensor(x, "x", _FLOATS, 2)
    _check_tensor(ids, "ids", (torch.int32,), 2)
    _check_tensor(w, "w", (torch.float32,), 2)
    _check_tensor(out, "out", _FLOATS, 2)
    info = engine.layer_info(layer)
    t, k = ids.shape
    if x.shape != (t, info["hidden"]) or out.shape != x.shape or w.shape != ids.shape:
        raise ValueError(f"host_call buffers do not fit layer {layer} (H={info['hidden']}): x {list(x.shape)}, "
                         f"ids {list(ids.shape)}, w {list(w.shape)}, out {list(out.shape)}")
    if not all(b.is_contiguous() for b in (x, ids, w, out)):
        raise ValueError("host_call buffers must be contiguous")
    native = engine._native.host_call(layer, x, ids, w, out)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    fns = (ctypes.c_void_p * 3).from_address(get(native.capsule, b"tandem.host_fns"))
    layout = tuple((t.data_ptr(), tuple(t.shape)) for t in (x, ids, w, out))
    return HostCall(native, x, ids, w, out, (fns[0], fns[1], fns[2]), layout)


class Doorbell:
    """Runs HostCalls when a CUDA stream rings for them (see csrc/host_call.h): a thread of the
    engine's process watches two words of `mailbox` (pinned int32 [32]: `ring` at 0, `done` at 16);
    the stream writes a call's number into ring after filling its buffers, and waits until done
    holds it before reading its out. No host function blocks the stream; ops.cuda_host writes and
    waits from the stream. `number(call)` registers a call once (the doorbell keeps it alive).
    The thread spins `spin_us` after each call, then naps; it ends with this object.
    `device_pointer` (ops.cuda_host's, for a GPU) maps host addresses to the ones a stream's memory
    operations take: `device_words` holds ring's and done's."""

    RING, DONE = 0, 16  # word offsets in the mailbox (64 bytes apart)

    def __init__(self, spin_us: int = 20000, device_pointer: Callable[[int], int] | None = None):
        pin = device_pointer is not None and torch.cuda.is_available()  # a stream reads and writes it
        self.mailbox = torch.zeros(32, dtype=torch.int32, pin_memory=pin)
        self._native = _ext().Doorbell(self.mailbox, _c_int(spin_us, "spin_us", 0, 10**7))
        self._numbers: dict[int, int] = {}  # id(HostCall.native) -> its number (natives kept alive by C++)
        self.device_words: tuple[int, int] | None = None
        if device_pointer is not None:
            self.device_words = (device_pointer(self.address(self.RING)), device_pointer(self.address(self.DONE)))

    def number(self, call: HostCall) -> int:
        v = self._numbers.get(id(call.native))
        if v is None:
            v = self._numbers[id(call.native)] = self._native.add(call.native)
        return v

    def address(self, word: int) -> int:
        """Host address of a mailbox word (RING or DONE)."""
        return self.mailbox.data_ptr() + 4 * word

    @property
    def rings(self) -> int:
        """Calls the thread has run."""
        return self._native.rings

    @property
    def unknown(self) -> int:
        """Rings that named no registered call (answered with done, nothing run)."""
        return self._native.unknown


def _c_int(value, name: str, low: int, high: int = INT_MAX) -> int:
    """`value` as the integer a binding takes, if it is an int (not a bool or float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}]; got {value!r}")
    return int(value)


def _check_layer(engine: Engine, layer) -> int:
    """A layer id add_layer returned (the engine checks too, but only one that fits a C int)."""
    n = engine._native.n_layers
    ids = f"0..{n - 1}" if n else "none yet: add_layer first"
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
        raise ValueError(f"layer must be an int, one of this engine's layer ids ({ids}); got {layer!r}")
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} does not exist; this engine has {n} layer(s) (ids {ids})")
    return int(layer)


def _formats_of(fmt: str | Sequence[str]) -> tuple[str, str, str]:
    fmts = (fmt,) * 3 if isinstance(fmt, str) else tuple(fmt) if isinstance(fmt, (list, tuple)) else ()
    known = formats()
    if len(fmts) != 3 or not all(isinstance(f, str) for f in fmts):
        raise ValueError(f"fmt must be a format name or a (gate, up, down) tuple of names; got {fmt!r}")
    for f in fmts:
        if f not in known:
            raise ValueError(f"unknown weight format {f!r}; known formats: {', '.join(known)}")
    return fmts


def _weight(t, name: str, fmt: str, online: bool, online_format: bool = False) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array; got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (the engine copies it into its own memory); got {t.device}")
    if online and t.dtype not in _FLOATS:
        raise TypeError(f"{name}: format {fmt} is quantized at load from float32 or bfloat16 weights; got {t.dtype}")
    if not online and t.dtype != torch.uint8:
        what = "prequantized rows" if online_format else "the file's raw blocks"
        raise TypeError(f"{name}: format {fmt} takes {what} as uint8 [E, rows, row_bytes]; got {t.dtype}")
    return t.contiguous()


def _check_tensor(t, name: str, dtypes: tuple, ndim: int, hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must be {allowed}; got {t.dtype}" + (f" ({hint})" if hint else ""))
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {list(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor; got {t.device}")
