"""The CPU expert engine's machinery: NUMA slices (through an injected topology), submit/wait from
several threads, bad input, ISA selection, lazy import of the extension."""

import os
import subprocess
import importlib
import sys
import threading

import pytest
import torch

from tandem.ops import cpu
from tandem.ops.cpu_topology import split_threads
from tests.ops.moe_cases import (
    TOL_F32,
    assert_matches,
    dense_weights,
    dequant_ref,
    gguf_blocks,
    reference,
    routing,
    tokens,
)

CPUS = sorted(os.sched_getaffinity(0))
# Two fake nodes: one cpu each where the machine has two (CI), else both on the only cpu.
FAKE_NODES = [[CPUS[0]], [CPUS[1]]] if len(CPUS) > 1 else None


def _two_node_engine(isa="generic"):
    if FAKE_NODES is None:
        pytest.skip("needs two cpus to inject a two-node topology")
    return cpu.create_engine(n_threads=2, numa_nodes=FAKE_NODES, isa=isa)


def _layer_sources(fmts, E, I, H, seed=0):
    """Weights for add_layer and the dequantized weights the engine should compute with."""
    if fmts[0] in ("BF16", "INT8", "INT4"):
        dense = dense_weights(E, I, H, seed=seed)
        return dense, tuple(dequant_ref(f, t) for f, t in zip(fmts, dense))
    shapes = ((E, I, H), (E, I, H), (E, H, I))
    pairs = [gguf_blocks(f, *s, seed=seed + i) for i, (f, s) in enumerate(zip(fmts, shapes))]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


@pytest.mark.parametrize(
    "fmts,E,I,H",
    [
        (("BF16",) * 3, 5, 96, 72),
        (("INT8",) * 3, 5, 96, 72),  # one row scale spans both nodes' columns of down
        (("INT4",) * 3, 4, 192, 128),  # 3 groups of 64: an uneven split
        (("Q4_K", "Q4_K", "Q6_K"), 4, 512, 256),
        (("Q4_K", "Q4_K", "Q6_K"), 4, 256, 256),  # one down block: one node gets an empty slice
    ],
)
def test_fake_two_nodes_equal_one_node(fmts, E, I, H):
    src, held = _layer_sources(fmts, E, I, H)
    one = cpu.create_engine(n_threads=2, numa_nodes=[CPUS], isa="generic")
    two = _two_node_engine()
    l1, l2 = cpu.add_layer(one, fmts, *src), cpu.add_layer(two, fmts, *src)
    info1, info2 = one.layer_info(l1), two.layer_info(l2)
    assert info1["slices"] == [(0, I)]
    slices = info2["slices"]
    assert len(slices) == 2 and slices[0][0] == 0 and slices[0][1] == slices[1][0] and slices[1][1] == I
    # Each node holds only its slice (INT8 repeats down's 4-byte row scale on both nodes).
    assert info2["bytes"] - info1["bytes"] == (E * H * 4 if fmts[2] == "INT8" else 0)
    x = tokens(17, H)
    ids, w = routing(17, E, 3, kind="padded")
    out1 = cpu.wait(one, cpu.submit(one, l1, x, ids, w))
    out2 = cpu.wait(two, cpu.submit(two, l2, x, ids, w))
    assert_matches(out2, out1, 1e-5, "2 nodes vs 1")
    assert_matches(out2, reference(x, ids, w, *held), TOL_F32)
    out2_bf16 = cpu.wait(two, cpu.submit(two, l2, x.bfloat16(), ids, w))
    assert_matches(out2_bf16.float(), reference(x.bfloat16(), ids, w, *held), 8e-3)


@pytest.mark.parametrize("isa", [pytest.param("amx", marks=pytest.mark.amx), "amx-emu"])
@pytest.mark.parametrize(
    "fmts,E,I,H",
    [
        (("INT8",) * 3, 5, 96, 72),
        (("Q4_K", "Q4_K", "Q6_K"), 4, 512, 256),
        (("Q4_K", "Q4_K", "Q6_K"), 4, 256, 256),  # one node gets an empty slice
    ],
)
def test_fake_two_nodes_prefill_equal_one_node(isa, fmts, E, I, H):
    """Many tokens per expert (the prefill kernels; down per expert, then a sum per token) on two
    nodes: the same sums as one node, partials added in node order. (INT8 quantizes down's
    activations per row of a node's slice, so its two nodes round differently from one.)"""
    if isa not in cpu.isa_info()["cpu"] or isa not in cpu.isa_info()["built"]:
        pytest.skip(f"{isa} is not available here")
    src, held = _layer_sources(fmts, E, I, H)
    one = cpu.create_engine(n_threads=2, numa_nodes=[CPUS], isa=isa)
    two = _two_node_engine(isa)
    l1, l2 = cpu.add_layer(one, fmts, *src), cpu.add_layer(two, fmts, *src)
    x = tokens(64, H)
    ids, w = routing(64, E, 3, kind="padded")
    assert "big_path" in one.kernel_info()[fmts[0]]
    for dtype in (torch.float32, torch.bfloat16):
        out1 = cpu.wait(one, cpu.submit(one, l1, x.to(dtype), ids, w))
        out2 = cpu.wait(two, cpu.submit(two, l2, x.to(dtype), ids, w))
        tol = 3e-2 if fmts[0] == "INT8" else 1e-5 if dtype == torch.float32 else 8e-3
        assert_matches(out2.float(), out1.float(), tol, f"{isa} 2 nodes vs 1")
    assert_matches(out2.float(), reference(x.bfloat16(), ids, w, *held), 3e-2, f"{isa} 2 nodes vs the reference")


def test_threads_split_over_nodes():
    assert split_threads(16, [8, 8]) == [8, 8]
    assert split_threads(6, [4, 2]) == [4, 2]
    assert split_threads(2, [7, 1]) == [1, 1]
    e = cpu.create_engine(n_threads=3, numa_nodes=[CPUS[:1], CPUS[1:2] or CPUS[:1]] if len(CPUS) > 1 else [CPUS])
    assert e.n_threads == 3


@pytest.fixture(scope="module")
def engine():
    return cpu.create_engine(n_threads=2, isa="generic")


@pytest.fixture(scope="module")
def bf16_layer(engine):
    dense = dense_weights(6, 64, 96, seed=3)
    return cpu.add_layer(engine, "BF16", *dense), tuple(dequant_ref("BF16", t) for t in dense)


def test_submit_and_wait_from_several_threads(engine, bf16_layer):
    layer, held = bf16_layer
    cases = []
    for i in range(8):
        x = tokens(1 + 7 * i, 96, seed=i)
        ids, w = routing(x.shape[0], 6, 1 + i % 4, seed=i)
        cases.append((x, ids, w, reference(x, ids, w, *held)))
    errors = []

    def worker(j):
        try:
            for rep in range(6):
                x, ids, w, ref = cases[(j + rep) % len(cases)]
                assert_matches(cpu.wait(engine, cpu.submit(engine, layer, x, ids, w)), ref, TOL_F32)
        except Exception as exc:  # surfaced below: pytest does not see other threads' failures
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_several_submits_before_waiting(engine, bf16_layer):
    """A second submit waits for the first job (not for its wait): no deadlock, no overwrite."""
    layer, held = bf16_layer
    cases = [(tokens(9 + i, 96, seed=i), *routing(9 + i, 6, 2, seed=i)) for i in range(3)]
    handles = [cpu.submit(engine, layer, *c) for c in cases]
    for h, (x, ids, w) in reversed(list(zip(handles, cases))):
        assert_matches(cpu.wait(engine, h), reference(x, ids, w, *held), TOL_F32)
    assert cpu.wait(engine, handles[0]) is handles[0].out  # waiting twice is harmless


def test_submit_returns_at_once_and_wait_releases_the_gil():
    e = cpu.create_engine(n_threads=1, numa_nodes=[CPUS[:1]], isa="generic")
    layer = cpu.add_layer(e, "BF16", *dense_weights(4, 256, 512))
    x = tokens(256, 512)
    ids, w = routing(256, 4, 4)
    h = cpu.submit(e, layer, x, ids, w)  # ~0.1 s of work for one generic thread
    assert e._native.completed() < h.ticket
    waiting = threading.Event()

    def waiter():
        waiting.set()
        cpu.wait(e, h)

    t = threading.Thread(target=waiter)
    t.start()
    waiting.wait()
    progress = 0  # this thread runs while the other one waits, so wait released the GIL
    while e._native.completed() < h.ticket:
        progress += 1
    t.join()
    assert progress > 100


# --- bad input: a Python exception with a clear message, never a crash ---


def test_bad_submit_inputs(engine, bf16_layer):
    layer, _ = bf16_layer
    x = tokens(4, 96)
    ids, w = routing(4, 6, 2)
    with pytest.raises(TypeError, match="x must be"):
        cpu.submit(engine, layer, x.half(), ids, w)
    with pytest.raises(TypeError, match="int32"):
        cpu.submit(engine, layer, x, ids.long(), w)
    with pytest.raises(TypeError, match="w must be"):
        cpu.submit(engine, layer, x, ids, w.double())
    with pytest.raises(ValueError, match="H = 96"):
        cpu.submit(engine, layer, tokens(4, 95), ids, w)
    with pytest.raises(ValueError, match="ids must be"):
        cpu.submit(engine, layer, x, ids[:3], w)
    with pytest.raises(ValueError, match="w must have the shape"):
        cpu.submit(engine, layer, x, ids, w[:, :1])
    with pytest.raises(ValueError, match="3-D|2-D"):
        cpu.submit(engine, layer, x[None], ids, w)
    for bad in (6, -2, 1 << 30):
        bad_ids = ids.clone()
        bad_ids[2, 1] = bad
        with pytest.raises(ValueError, match=rf"ids\[2, 1\] = {bad} is out of range"):
            cpu.submit(engine, layer, x, bad_ids, w)
    with pytest.raises(ValueError, match="layer 99 does not exist"):
        cpu.submit(engine, 99, x, ids, w)
    with pytest.raises(TypeError, match="out_dtype"):
        cpu.submit(engine, layer, x, ids, w, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="another engine"):
        cpu.wait(cpu.create_engine(n_threads=1), cpu.submit(engine, layer, x, ids, w))
    # The engine still works after all that.
    cpu.wait(engine, cpu.submit(engine, layer, x, ids, w))


def test_extension_checks_its_own_inputs(engine, bf16_layer):
    """Callers that bypass tandem.ops.cpu still get exceptions, not crashes."""
    layer, _ = bf16_layer
    native = engine._native
    x = tokens(4, 96)
    ids, w = routing(4, 6, 2)
    out = torch.empty(4, 96)
    with pytest.raises(TypeError, match="ids must be int32"):
        native.submit(layer, x, ids.long(), w, out)
    with pytest.raises(TypeError, match="out must be"):
        native.submit(layer, x, ids, w, out.half())
    with pytest.raises(ValueError, match="out must have the shape"):
        native.submit(layer, x, ids, w, torch.empty(4, 95))
    with pytest.raises(ValueError, match="contiguous"):
        native.submit(layer, torch.randn(96, 4).t(), ids, w, out)
    with pytest.raises(ValueError, match="unknown ticket"):
        native.wait(10**9)


def test_ints_outside_the_extensions_c_types_name_the_argument(engine, bf16_layer):
    """Fuzzing: a layer of 2**70 (or 10**30 threads to a probe) reached nanobind, whose "incompatible
    function arguments" names no argument; a bool passed as a layer id."""
    layer, _ = bf16_layer
    x = tokens(4, 96)
    ids, w = routing(4, 6, 2)
    for bad in (2**70, 2**31, True, 1.0):
        for call in (lambda: cpu.submit(engine, bad, x, ids, w), lambda: engine.layer_info(bad),
                     lambda: cpu.host_call(engine, bad, x, ids, w, torch.empty_like(x))):
            with pytest.raises(ValueError, match=rf"layer (must be an int, one of|{bad} does not exist).*ids \(?0\.\."):
                call()
    for bad in (2**70, 2**31, -64, 2048, 64.0):
        with pytest.raises(ValueError, match=r"prefill_rows must be an int in \[0, 1024\]"):
            engine.prefill_rows = bad
    probes = [
        (lambda: cpu.stream_read_bandwidth(2**70, 1), r"nbytes must be an int in \[1, 18446744073709551615\]"),
        (lambda: cpu.stream_read_bandwidth(1 << 22, 10**30), r"threads must be an int in \[1, 2147483647\]"),
        (lambda: cpu.stream_read_bandwidth(1 << 22, 1, rounds=2**40), r"rounds must be an int in \[1, 2147483647\]"),
        (lambda: cpu.stream_read_bandwidth(1 << 22, 1, streams=2**40), r"streams must be an int in \[0, 64\]"),
        (lambda: cpu.amx_peak("bf16", 2**40), r"threads must be an int in \[1, 2147483647\]"),  # AMX or not
        (lambda: cpu.Doorbell(spin_us=2**40), r"spin_us must be an int in \[0, 10000000\]"),
        (lambda: cpu.wait(engine, cpu.Handle(engine, 2**70, x)), r"handle.ticket must be an int in \[0, 1844"),
    ]
    for call, message in probes:
        with pytest.raises(ValueError, match=message):
            call()
    cpu.wait(engine, cpu.submit(engine, layer, x, ids, w))  # the engine still works


def test_bad_layers(engine):
    gate, up, down = dense_weights(4, 128, 100)
    with pytest.raises(ValueError, match="unknown weight format 'Q4_0'"):
        cpu.add_layer(engine, "Q4_0", gate, up, down)
    with pytest.raises(ValueError, match=r"\(gate, up, down\)"):
        cpu.add_layer(engine, ("BF16", "BF16"), gate, up, down)
    with pytest.raises(ValueError, match="K = 100 is not a multiple of INT4's block of 64"):
        cpu.add_layer(engine, "INT4", gate, up, down)
    with pytest.raises(ValueError, match="down is"):
        cpu.add_layer(engine, "BF16", gate, up, down.transpose(1, 2))
    with pytest.raises(ValueError, match="up is"):
        cpu.add_layer(engine, "BF16", gate, up[:, :64], down)
    with pytest.raises(TypeError, match="Q4_K takes the file's raw blocks as uint8"):
        cpu.add_layer(engine, "Q4_K", gate, up, down)
    with pytest.raises(TypeError, match="INT8 is quantized at load from float32 or bfloat16"):
        cpu.add_layer(engine, "INT8", gate.to(torch.uint8), up, down)
    raw, _ = gguf_blocks("Q4_K", 4, 128, 256)
    draw, _ = gguf_blocks("Q4_K", 4, 256, 128 * 2)
    with pytest.raises(ValueError, match="not a whole number of Q4_K blocks"):
        cpu.add_layer(engine, "Q4_K", raw[..., :-1].contiguous(), raw, draw)
    with pytest.raises(ValueError, match="3-D"):
        cpu.add_layer(engine, "BF16", gate[0], up, down)


def test_bad_topology():
    with pytest.raises(ValueError, match="not available"):
        cpu.create_engine(numa_nodes=[[max(CPUS) + 1000]])
    with pytest.raises(ValueError, match="more than one node"):
        cpu.create_engine(numa_nodes=[[CPUS[0]], [CPUS[0]]])
    with pytest.raises(ValueError, match="non-empty"):
        cpu.create_engine(numa_nodes=[[]])
    with pytest.raises(ValueError, match="n_threads"):
        cpu.create_engine(n_threads=0)


def test_isa_override(monkeypatch):
    info = cpu.isa_info()
    assert "generic" in info["built"] and "generic" in info["cpu"]
    monkeypatch.setenv("TANDEM_ISA", "generic")
    assert cpu.create_engine(n_threads=1).isa == "generic"
    for isa in ("avx2", "avx512", "amx", "amx-emu"):
        monkeypatch.setenv("TANDEM_ISA", isa)
        if isa in info["built"] and isa in info["cpu"]:
            assert cpu.create_engine(n_threads=1).isa == isa
            assert cpu.create_engine(n_threads=1, isa="generic").isa == "generic"  # the argument wins
        else:
            with pytest.raises(ValueError, match=f"TANDEM_ISA={isa}: "):
                cpu.create_engine(n_threads=1)
    monkeypatch.setenv("TANDEM_ISA", "sse9")
    with pytest.raises(ValueError, match="TANDEM_ISA=sse9 is unknown"):
        cpu.create_engine(n_threads=1)
    monkeypatch.delenv("TANDEM_ISA")
    with pytest.raises(ValueError, match="is unknown"):
        cpu.create_engine(n_threads=1, isa="sse9")
    with pytest.raises(TypeError, match="isa must be a string"):
        cpu.create_engine(n_threads=1, isa=3)
    best = next(i for i in ("amx", "avx512", "avx2", "generic") if i in info["built"] and i in info["cpu"])
    assert cpu.create_engine(n_threads=1).isa == best


def test_importing_does_not_load_the_extension(monkeypatch):
    # Import a fresh copy of the module with the extension unloaded; monkeypatch restores both.
    import tandem.ops

    for name in ("tandem._C", "tandem.ops.cpu"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(tandem.ops, "cpu", None, raising=False)
    fresh = importlib.import_module("tandem.ops.cpu")
    assert fresh is not cpu and "tandem._C" not in sys.modules, "tandem.ops.cpu imported tandem._C at import time"


# --- found by fuzzing the engine's API: each was a crash, a hang or a silent wrong result ---------

_PRELUDE = """
import gc, sys, time, torch
sys.path.insert(0, {root!r})
from tandem.ops import cpu
from tests.ops.moe_cases import dense_weights, routing, tokens
e = cpu.create_engine(n_threads=2, isa="generic")
L = cpu.add_layer(e, "BF16", *dense_weights(8, 512, 1024))
x = tokens(512, 1024); ids, w = routing(512, 8, 2)
"""


def _survives(body: str) -> None:
    """Runs body after _PRELUDE in a fresh interpreter: a crash shows as a negative return code."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _PRELUDE.format(root=root) + body
    # Large blocks always mmapped: memory freed under a running job is unmapped, so a write into it
    # crashes at once instead of landing in whatever reused it.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip().endswith("ok"), done.stdout[-500:]


def test_a_dropped_output_buffer_outlives_its_job():
    """The native submit keeps `out` alive until the job is done (callers that bypass
    tandem.ops.cpu, or a wrapper collected mid-job, used to free memory the workers wrote)."""
    _survives("""
for _ in range(50):
    e._native.submit(L, x, ids, w, torch.empty(512, 1024))
gc.collect(); time.sleep(0.2)
print("ok")
""")


def test_an_engine_wrapper_collected_mid_job_keeps_the_output():
    _survives("""
hc = cpu.host_call(e, L, x[:1].clone(), ids[:1].clone(), w[:1].clone(), torch.empty(1, 1024))
cpu.submit(e, L, x, ids, w)  # handle dropped
del e; gc.collect()
y = torch.zeros(2048, 1024); time.sleep(1.0)
assert int((y != 0).sum()) == 0, "the job wrote into freed memory"
print("ok")
""")


def test_a_host_call_dropped_before_its_wait_finishes_its_job_first():
    _survives("""
x, (ids, w) = tokens(4096, 1024), routing(4096, 8, 2)
hc = cpu.host_call(e, L, x, ids, w, torch.empty(4096, 1024))
hc.native.run_submit()
del hc; gc.collect()
y = torch.zeros(4096, 1024); time.sleep(1.0)
assert int((y != 0).sum()) == 0, "the job wrote into freed memory"
print("ok")
""")


def test_thread_counts_are_bounded_and_thread_exhaustion_is_an_error():
    with pytest.raises(ValueError, match="per core"):
        cpu.create_engine(n_threads=cpu.MAX_THREADS_PER_CORE * len(CPUS) + 1)
    _survives("""
import resource
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # room for a few hundred thread stacks
import tandem._C as C
try:
    C.Engine([[0]], [4000], 1000, "generic")
    print("created")
except RuntimeError as err:
    assert "could not start 4000 engine threads" in str(err), err
print("ok")
""")


@pytest.mark.parametrize("fmt", ["INT8", "INT4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_where_quantized(fmt, bad):
    g, u, d = dense_weights(2, 64, 64)
    g[1, 5, 7] = bad
    e = cpu.create_engine(n_threads=2, isa="generic")
    with pytest.raises(ValueError, match="expert 1, row 5, column 7"):
        cpu.add_layer(e, fmt, g, u, d)
    layer = cpu.add_layer(e, "BF16", g, u, d)  # BF16 keeps the value (and the NaN shows in the output)
    ids = torch.tensor([[1]], dtype=torch.int32)
    out = cpu.wait(e, cpu.submit(e, layer, tokens(1, 64), ids, torch.ones(1, 1)))
    assert not torch.isfinite(out).all()


def test_host_call_errors_are_per_run_and_moved_buffers_are_refused():
    e = cpu.create_engine(n_threads=2, isa="generic")
    layer = cpu.add_layer(e, "BF16", *dense_weights(6, 64, 96))
    x = tokens(4, 96)
    ids, w = routing(4, 6, 2)
    out = torch.empty(4, 96)
    hc = cpu.host_call(e, layer, x, ids, w, out)
    ids[0, 0] = 77
    with pytest.raises(RuntimeError, match="out of range"):
        hc.run()
    ids[0, 0] = 1
    assert torch.equal(hc.run(), cpu.wait(e, cpu.submit(e, layer, x, ids, w)))  # the old error is gone
    out.resize_(8, 96)
    with pytest.raises(ValueError, match="out moved or changed shape"):
        hc.run()


def test_isa_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="isa=avx1024 is unknown"):
        cpu.create_engine(n_threads=1, isa="avx1024")
    with pytest.raises(TypeError, match="prequantized must be True or False"):
        cpu.add_layer(cpu.create_engine(n_threads=1), "BF16", *dense_weights(2, 64, 64), prequantized="no")


def test_pinned_reports_every_workers_attempt():
    """Engine.pinned read True before the workers had tried to pin (a race, ~1 read in 20 without
    the fix). Cpu 9999 does not exist, so pinning fails: it must read False from the start."""
    for _ in range(50):
        assert cpu._ext().Engine([[9999]], [2], 0, "").pinned is False
    assert cpu.create_engine(1).pinned is True


@pytest.mark.parametrize("isa", ["generic", pytest.param("amx", marks=pytest.mark.amx), "amx-emu"])
def test_phase_spread_brackets_each_barrier(isa):
    """last_phase_spread: per phase the first and the last worker to leave it; each worker's phases
    end in order; the last ones are last_phases. Jobs with prefill (`big`) kernels meet at barriers,
    so no worker leaves gate/up before the last one left prep_x, nor down before the last left
    prep_h (decode's flow mode has no barriers: the generic kernels have no `big`)."""
    if isa not in cpu.isa_info()["cpu"] or isa not in cpu.isa_info()["built"]:
        pytest.skip(f"{isa} is not available here")
    src, _ = _layer_sources(("INT8",) * 3, 5, 96, 72)
    eng = cpu.create_engine(n_threads=2, isa=isa)
    layer = cpu.add_layer(eng, ("INT8",) * 3, *src)
    x = tokens(64, 72)
    ids, w = routing(64, 5, 3)
    cpu.wait(eng, cpu.submit(eng, layer, x, ids, w))
    spread = eng.last_phase_spread()
    assert list(spread) == list(cpu.PHASES)
    assert {p: last for p, (_, last) in spread.items()} == eng.last_phases()
    firsts, lasts = zip(*spread.values())
    assert all(0 < f <= l for f, l in spread.values()), spread
    assert list(firsts) == sorted(firsts) and list(lasts) == sorted(lasts), spread
    if "big_path" in eng.kernel_info()["INT8"]:
        assert spread["gate_up"][0] >= spread["prep_x"][1] and spread["down"][0] >= spread["prep_h"][1], spread
