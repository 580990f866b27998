"""Dual-path prefill (layers/dual_experts.py): a long step's experts split between the CPU engine
and the device, which reads its share out of the engine's own memory (ops/triton/tiled.py).

Bounds, against the MoE of ops.reference in float64 on the file's dequantized weights:
- every expert on the device: fp32 summation order only (1e-4 of max |ref|);
- every expert on the engine: exactly CpuExperts' output;
- split: within the engine's own bound (its ISA kernels quantize activations: isa_cases'
  ISA_VS_GENERIC), and both sides hold experts, so a dropped or doubled share would show
  (one expert's share of the output is far above the bound).
Without CUDA the "device" is the CPU (Triton's interpreter decodes the slabs); on a GPU (marked),
x lives there and the engine's slabs are copied to it.
"""

import collections
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the tiled kernel is defined

from tandem.layers.cpu_experts import CpuExperts
from tandem.layers.dual_experts import DualExperts, run_rows
from tandem.layers.dual_rates import DualRates, split
from tandem.ops import cpu
from tandem.ops.reference import grouped_mm_supported, joined_halves
from tests.ops.isa_cases import ISA_VS_GENERIC, usable_isas
from tests.ops.moe_cases import assert_matches, gguf_blocks, reference, routing, tokens

E, I, H, K, T = 8, 256, 512, 2, 40
FMTS = ("Q4_K", "Q4_K", "Q6_K")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []
ALL_TO_DEVICE = DualRates(cpu_bw=1.0, cpu_flops=1.0, h2d_bw=1e30)
ALL_TO_CPU = DualRates(h2d_bw=1.0)


@pytest.fixture(scope="module")
def layer():
    isas = usable_isas()
    if not isas:
        pytest.skip("no ISA with the tiled layout on this CPU")
    engine = cpu.create_engine(2, isa=isas[-1])
    blocks = [gguf_blocks(f, E, r, c, seed) for f, (r, c), seed in zip(FMTS, [(I, H), (I, H), (H, I)], (0, 1, 2))]
    index = cpu.add_layer(engine, FMTS, *[b for b, _ in blocks])
    return CpuExperts(engine, index, FMTS), [d for _, d in blocks]


def run(experts, x, ids, w):
    return experts.wait(experts.submit(x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE))).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batched_experts_equal_the_per_expert_loop(dtype):
    """ops.reference.moe_experts_padded (the device's share: a few batched matmuls) against
    moe_experts: fp32 to 1e-6 of max |ref| (matmul order); bf16 within one rounding step (2^-7)."""
    from tandem.ops import reference as ref

    g = torch.Generator().manual_seed(7)
    n_tok, n_exp = 37, 6
    x = torch.randn(n_tok, 64, generator=g).to(dtype)
    ids = torch.randint(-1, n_exp - 1, (n_tok, 3), generator=g, dtype=torch.int32)  # expert 5 gets no token
    ids[0] = torch.tensor([2, 2, -1])  # a repeat within a token
    w = torch.rand(n_tok, 3, generator=g)
    mats = [(torch.randn(n_exp, a, b, generator=g) / 8).to(dtype) for a, b in ((48, 64), (48, 64), (64, 48))]
    flat = ids.flatten().long()
    counts = torch.bincount(flat[flat >= 0], minlength=n_exp).tolist()
    assert counts[-1] == 0
    want = ref.moe_experts(x, ids, w, *mats).float()
    got = ref.moe_experts_padded(x, ids, w, *mats, counts).float()
    assert float((got - want).abs().max()) <= (1e-6 if dtype == torch.float32 else 2**-7) * float(want.abs().max())


def test_grouped_matmuls_only_where_torch_has_grouped_kernels(monkeypatch):
    """CUDA: bf16 on compute capability 9.x / 10.x only (elsewhere torch's grouped matmul loops
    with a host sync a call: the padded path instead); CPU: fp32 / bf16; rows of 16-byte multiples."""
    from tandem.ops import reference as ref

    cuda, cpu_dev = torch.device("cuda", 0), torch.device("cpu")
    for cap, want in (((9, 0), True), ((10, 0), True), ((8, 9), False), ((8, 0), False), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert ref.grouped_mm_supported(torch.bfloat16, cuda, 2048, 1408) is want, cap
        assert not ref.grouped_mm_supported(torch.float32, cuda, 2048, 1408)
    assert ref.grouped_mm_supported(torch.float32, cpu_dev, 64, 48)
    assert ref.grouped_mm_supported(torch.bfloat16, cpu_dev, 64, 48)
    assert not ref.grouped_mm_supported(torch.float16, cpu_dev, 64, 48)
    assert not ref.grouped_mm_supported(torch.bfloat16, cpu_dev, 64, 44)  # 88-byte rows


@pytest.mark.parametrize("joined", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_per_expert_loop(dtype, joined, monkeypatch):
    """ops.reference.moe_experts_grouped (rows sorted by expert, three grouped matmuls, summed into
    an fp32 output) against moe_experts, on the test's device where torch's grouped matmul takes
    the dtype: fp32 to 1e-6 of max |ref|; bf16 within one rounding step (2^-7). An expert with no
    rows (a repeated offset) and a second call adding into the same sum included. joined: gate and
    up are the halves of one [E, 2I, H] tensor (as DualExperts decodes them): two grouped matmuls
    a call instead of three."""
    from tandem.ops import reference as ref

    calls = []
    real = ref._GROUPED_MM
    monkeypatch.setattr(ref, "_GROUPED_MM", lambda *a, **k: calls.append(1) or real(*a, **k))

    device = torch.device(DEVICE)
    if not ref.grouped_mm_supported(dtype, device, 64, 48):
        pytest.skip(f"torch's grouped matmul does not take {dtype} on {DEVICE}")
    g = torch.Generator().manual_seed(8)
    n_tok, n_exp = 37, 6
    x = torch.randn(n_tok, 64, generator=g).to(dtype)
    ids = torch.randint(-1, n_exp - 1, (n_tok, 3), generator=g, dtype=torch.int32)  # expert 5 gets no row
    w = torch.rand(n_tok, 3, generator=g)
    mats = [(torch.randn(n_exp, a, b, generator=g) / 8).to(dtype) for a, b in ((48, 64), (48, 64), (64, 48))]
    flat = ids.flatten().long()
    counts = torch.bincount(flat[flat >= 0], minlength=n_exp).tolist()
    assert counts[-1] == 0
    rows = flat.argsort(stable=True)[flat.numel() - sum(counts):]
    tok, rw = (rows // 3).to(device), w.flatten()[rows].to(device)
    out = torch.zeros(n_tok, 64, device=device)
    on = [t.to(device) for t in (x, *mats)]
    if joined:
        gate_up = torch.cat(on[1:3], dim=1)
        on[1:3] = gate_up[:, :48], gate_up[:, 48:]
    split_at = counts[0] + counts[1]  # experts 0-1, then 2-5, into one sum
    ref.moe_experts_grouped(on[0], tok[:split_at], rw[:split_at], *[m[:2] for m in on[1:]], counts[:2], out)
    ref.moe_experts_grouped(on[0], tok[split_at:], rw[split_at:], *[m[2:] for m in on[1:]], counts[2:], out)
    assert len(calls) == (4 if joined else 6)
    got = out.to(dtype).float().cpu()
    want = ref.moe_experts(x, ids, w, *mats).float()
    assert float((got - want).abs().max()) <= (1e-6 if dtype == torch.float32 else 2**-7) * float(want.abs().max())


def test_joined_halves_only_takes_the_two_halves_of_one_tensor():
    both = torch.randn(3, 10, 4)
    gate, up = both[:, :5], both[:, 5:]
    assert torch.equal(joined_halves(gate, up), both)
    assert joined_halves(up, gate) is None  # up's rows first
    assert joined_halves(gate, gate) is None
    assert joined_halves(gate.clone(), up.clone()) is None  # two tensors
    assert joined_halves(both[:, :4], both[:, 4:8]) is None  # not halves: each expert's rows 8 apart, not 10
    assert joined_halves(gate, up.to(torch.float64)) is None


def test_split_takes_most_routed_experts_while_the_copy_beats_the_engine():
    rates = DualRates(cpu_bw=100.0, cpu_flops=1e12, h2d_bw=100.0)  # copying an expert costs what streaming it does
    assert split([5, 0, 9, 1], 100, 1.0, rates) == [2]  # engine keeps 2 of 3 seconds; device 1
    assert split([5, 0, 9, 1], 100, 1.0, DualRates(cpu_bw=100.0, cpu_flops=1e12, h2d_bw=1e9)) == [2, 0, 3]
    assert split([5, 0, 9, 1], 100, 1.0, DualRates(cpu_bw=100.0, cpu_flops=1e12, h2d_bw=10.0)) == []
    assert split([0, 0], 100, 1.0, rates) == []
    # Experts already copied to the device (staged ahead) come first, whatever their tokens, and
    # cost no copy: here the device then takes the busiest other expert as if it had none yet.
    assert split([5, 0, 9, 1], 100, 1.0, rates, on_device=[1, 3]) == [1, 3, 2]
    # ... unless their copies are still under way: the device starts that much later (busy_s),
    # and the busiest other expert no longer shortens the layer.
    assert split([5, 0, 9, 1], 100, 1.0, rates, on_device=[1, 3], busy_s=1.5) == [1, 3]
    assert split([5, 0, 9, 1], 100, 1.0, rates, on_device=[1, 3], busy_s=0.5) == [1, 3, 2]


@pytest.mark.parametrize("kind", ["random", "padded"])  # padded: a third of the slots -1 (no expert)
@pytest.mark.parametrize("rates, what", [(ALL_TO_DEVICE, "device"), (ALL_TO_CPU, "cpu"), (DualRates(), "split")])
def test_dual_layer_equals_each_path(layer, rates, what, kind):
    experts, (gate, up, down) = layer
    dual = DualExperts(experts, E, H, I, rates=rates, min_tokens=1, buffer_bytes=1)  # one expert at a time
    x = tokens(T, H, seed=3)
    ids, w = routing(T, E, K, kind, seed=4)
    got = run(dual, x, ids, w)
    ref = reference(x, ids, w, gate, up, down).float()
    alone = run(experts, x, ids, w)
    used = sorted(set(ids.flatten().tolist()) - {-1})
    if what == "device":
        assert dual.last_split and sorted(dual.last_split) == used
        assert_matches(got, ref, 1e-4, "every expert on the device")
    elif what == "cpu":
        assert dual.last_split == []
        assert torch.equal(got, alone)
    else:
        assert 0 < len(dual.last_split) < len(used), dual.last_split
        assert_matches(got, ref, ISA_VS_GENERIC["Q8_K"], "split")
    assert_matches(alone, ref, ISA_VS_GENERIC["Q8_K"], "the engine alone")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_padded_device_shares_agree(layer, monkeypatch, dtype):
    """Every expert on the device in runs of two: grouped matmuls (where torch's grouped matmul
    takes the dtype) and batched matmuls padded to each run's busiest expert give the same layer
    output, to fp32's summation order (bf16: one rounding step of max |out|)."""
    from tandem.ops import reference as ref

    experts, _ = layer
    x = tokens(T, H, seed=12).to(dtype)
    ids, w = routing(T, E, K, seed=13)
    if not ref.grouped_mm_supported(dtype, torch.device(DEVICE), H, I):
        pytest.skip(f"torch's grouped matmul does not take {dtype} on {DEVICE}")
    probe = DualExperts(experts, E, H, I)
    flat = ids.flatten().long()
    most = int(torch.bincount(flat[flat >= 0]).max())
    outs = {}
    for grouped in (True, False):
        monkeypatch.setattr(ref, "grouped_mm_supported", lambda *a, grouped=grouped: grouped)
        dual = DualExperts(experts, E, H, I, rates=ALL_TO_DEVICE, min_tokens=1,
                           buffer_bytes=probe.batch_bytes(2, 2 * most, dtype))
        outs[grouped] = run(dual, x, ids, w).float()
        assert len(dual.last_runs) >= 3, dual.last_runs
    bound = 1e-5 if dtype == torch.float32 else 2**-7
    assert float((outs[True] - outs[False]).abs().max()) <= bound * float(outs[False].abs().max())


@pytest.mark.parametrize("grouped", [False, True])
def test_batches_hold_their_rows_within_the_buffer(layer, grouped):
    """Runs of the device's experts fit the buffer with their matmuls' rows counted (padded: every
    expert as many as the run's busiest; grouped: each its own): each run within buffer_bytes (or a
    single expert), each as long as it can be, all experts in order."""
    experts, _ = layer
    probe = DualExperts(experts, E, H, I, buffer_bytes=1)
    one, row = probe.batch_bytes(1, 0, torch.bfloat16), probe.batch_bytes(1, 1, torch.bfloat16) - probe.batch_bytes(1, 0, torch.bfloat16)
    assert probe.batch_bytes(3, 70, torch.bfloat16) == 3 * one + 70 * row
    dual = DualExperts(experts, E, H, I, buffer_bytes=4 * (one + 40 * row))  # four experts of 40 tokens
    counts = [4000, 300, 40, 40, 40, 40, 3, 0]
    taken = [0, 1, 2, 3, 4, 5, 6]
    runs = dual.batches(taken, counts, torch.bfloat16, grouped)
    assert [e for r in runs for e in r] == taken
    assert runs[0] == [0], runs  # the hottest expert leaves no room for a second
    # padded: the 300-token expert runs alone (a 40-token one beside it would take 300 rows too)
    # and 40-token experts fill the buffer four at a time; grouped: each takes only its own rows
    assert [len(r) for r in runs] == ([1, 1, 4, 1] if not grouped else [1, 2, 4]), runs
    assert run_rows([1, 2, 6], counts, grouped) == (343 if grouped else 900)
    for r, nxt in zip(runs, runs[1:] + [[]]):
        fits = dual.batch_bytes(len(r), run_rows(r, counts, grouped), torch.bfloat16) <= dual.buffer_bytes
        assert fits or len(r) == 1
        if nxt:  # the next expert would not have fit
            more = r + nxt[:1]
            assert dual.batch_bytes(len(more), run_rows(more, counts, grouped), torch.bfloat16) > dual.buffer_bytes


def test_a_step_whose_slots_all_go_to_the_device_leaves_the_engine_out(layer, monkeypatch):
    """Every routed slot on the device: no engine call (no trip of x to the host, no zero output
    back), the output the device's share (+ add), and the step teaches the engine's rate nothing."""
    experts, held = layer
    dual = DualExperts(experts, E, H, I, rates=ALL_TO_DEVICE, min_tokens=1)
    x = tokens(T, H, seed=14)
    ids, w = routing(T, E, K, "padded", seed=15)
    calls = []
    monkeypatch.setattr(experts, "submit", lambda *a: calls.append(a) or pytest.fail("the engine was called"))
    add = torch.full((T, H), 0.5)
    pending = dual.submit(x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE))
    got = dual.wait(pending, add.to(DEVICE)).cpu()
    assert pending[0] is None and not calls
    assert_matches(got - add, reference(x, ids, w, *held).float(), 1e-4, "every slot on the device")
    dual.learn()
    assert dual.history[-1]["cpu_s"] == 0.0 and dual.history[-1]["cpu_bytes"] == 0


def test_short_steps_stay_on_the_engine(layer):
    experts, _ = layer
    dual = DualExperts(experts, E, H, I, rates=ALL_TO_DEVICE, min_tokens=T + 1)
    x = tokens(T, H, seed=5)
    ids, w = routing(T, E, K, seed=6)
    assert torch.equal(run(dual, x, ids, w), run(experts, x, ids, w))
    assert dual.last_split == []


def test_page_locks_are_undone_and_a_refusal_lowers_the_copy_rate(layer, monkeypatch):
    """register_slabs page-locks each large slab once and the locks go when the layer goes (a lock
    outliving its memory would serve later memory at those addresses from the old pages); where
    the driver refuses, the split counts copies at the pageable rate."""
    import gc

    from tandem.layers import dual_copies
    from tandem.layers import dual_experts as de
    from tandem.ops import cuda_host

    experts, _ = layer
    locked, unlocked = [], []
    monkeypatch.setattr(cuda_host, "register_host", lambda addr, n: locked.append(addr))
    monkeypatch.setattr(cuda_host, "unregister_host", lambda addr: unlocked.append(addr))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(dual_copies, "REGISTER_MIN_BYTES", 1)  # the tiny test slabs count as large and aligned
    dual = DualExperts(experts, E, H, I)
    slabs = {s.data_ptr() for node in dual.slabs for s, _ in node.values()}
    assert dual.register_slabs() == sum(s.numel() for node in dual.slabs for s, _ in node.values())
    assert dual.register_slabs() == 0  # once
    assert set(locked) == slabs and len(locked) == len(slabs)
    del dual
    gc.collect()
    assert sorted(unlocked) == sorted(locked)

    def refuse(addr, n):
        raise RuntimeError("cuMemHostRegister failed with CUDA error 1")

    monkeypatch.setattr(cuda_host, "register_host", refuse)
    dual = DualExperts(experts, E, H, I, rates=DualRates(h2d_bw=50e9))
    assert dual.register_slabs() == 0
    assert dual.rates.h2d_bw == de.PAGEABLE_H2D


def test_rates_learn_toward_what_each_side_achieved():
    from tandem.layers.dual_rates import LEARN_MIN_SECONDS, learned

    r = DualRates(cpu_bw=100.0, cpu_flops=1000.0, h2d_bw=50.0)
    slow_cpu = learned(r, (0.01, 0.04), None)  # the engine took 4x what the split predicted
    assert (slow_cpu.cpu_bw, slow_cpu.cpu_flops, slow_cpu.h2d_bw) == pytest.approx((50.0, 500.0, 50.0))
    fast_device = learned(r, None, (0.02, 0.01))
    assert fast_device.h2d_bw == pytest.approx(50.0 * 2**0.5) and fast_device.cpu_bw == 100.0
    assert learned(r, (1.0, LEARN_MIN_SECONDS / 2), (0.01, 0.0)) == r  # too short to tell; not measured
    assert learned(r, (0.01, 100.0), None).cpu_bw == pytest.approx(100.0 * 0.1**0.5)  # at most 10x a step
    # From the rates as they stand (other layers taught them since the step was predicted at r):
    # halfway (geometric mean) from there toward what the step achieved (4x slower than r: 25 bytes/s).
    now = DualRates(cpu_bw=200.0, cpu_flops=2000.0, h2d_bw=80.0)
    moved = learned(r, (0.01, 0.04), None, now)
    assert (moved.cpu_bw, moved.cpu_flops, moved.h2d_bw) == pytest.approx((200.0 / 8**0.5, 2000.0 / 8**0.5, 80.0))
    assert learned(r, None, None, now) == now


def test_a_slower_engine_than_predicted_hands_the_device_more(layer):
    # The engine is told it is ~1e3x faster than it is: it keeps every expert at first; after each
    # step its measured time pulls its rates down (at most sqrt(10)x a step), and within a few
    # long steps the device takes experts.
    experts, _ = layer
    fast = DualRates(cpu_bw=1e13, cpu_flops=1e14, h2d_bw=1e11)
    dual = DualExperts(experts, E, H, I, rates=fast, min_tokens=1)
    x = tokens(T, H, seed=5)
    ids, w = routing(T, E, K, seed=6)
    run(dual, x, ids, w)
    assert dual.last_split == []
    seen = []
    for _ in range(12):
        run(dual, x, ids, w)
        seen.append(len(dual.last_split))
        if seen[-1]:
            break  # the device's share runs in Triton's interpreter here: slow
    learned_rates = dual.rates_for(T)
    assert learned_rates.cpu_flops < fast.cpu_flops / 5 and max(seen) > 0, (learned_rates, seen)
    assert dual.rates == fast
    # A length not seen yet starts from the nearest one learned (the same machine), then learns on its own.
    assert dual.rates_for(4 * T) == learned_rates and dual.rates_for(T // 4) == learned_rates


def test_a_layers_step_teaches_the_layers_after_it(layer):
    """The model's dual layers share their learned rates: each step is learned from at the next
    layer's step (whose sync ran the stream past it), so layer B's split already follows what
    layer A measured, before B's own second step. Layers with rates of their own do not share."""
    experts, _ = layer
    from tandem.layers.dual_rates import SharedRates

    fast = DualRates(cpu_bw=1e13, cpu_flops=1e14, h2d_bw=1e11)  # the engine ~1e3x faster than it is
    shared = SharedRates()
    a, b = (DualExperts(CpuExperts(experts.engine, experts.layer, FMTS), E, H, I, rates=fast, min_tokens=1,
                        shared=shared) for _ in range(2))
    alone = DualExperts(CpuExperts(experts.engine, experts.layer, FMTS), E, H, I, rates=fast, min_tokens=1)
    x = tokens(T, H, seed=5)
    ids, w = routing(T, E, K, seed=6)
    run(a, x, ids, w)  # the first step of this length and format: recorded, teaches nothing
    run(b, x, ids, w)
    assert a.steps_recorded == 1 and b.rates_for(T) == fast and b.last_split == []
    run(alone, x, ids, w)
    run(alone, x, ids, w)
    assert alone.rates_for(T) == fast  # its own first step taught nothing; A's and B's never reach it
    run(a, x, ids, w)  # learns B's step (the engine ~1e3x slower than predicted): sqrt(10)x down
    assert b.steps_recorded == 1 and a.steps_recorded == 1
    assert b.rates_for(T).cpu_flops == pytest.approx(fast.cpu_flops * 0.1**0.5)
    assert a.rates_for(T) == b.rates_for(T) and alone.rates_for(T) == fast
    run(b, x, ids, w)  # learns A's second step: B's split at rates A measured, B's own second step not yet run
    assert b.rates_for(T).cpu_flops == pytest.approx(fast.cpu_flops * 0.1)


def test_double_buffered_runs_equal_one_run(layer):
    # A buffer of about three experts: several runs, each next run's copies started before the
    # run before computes (prefetched), and the same output as one run holding every expert.
    experts, _ = layer
    x = tokens(T, H, seed=8)
    ids, w = routing(T, E, K, seed=9)
    probe = DualExperts(experts, E, H, I, rates=ALL_TO_DEVICE, min_tokens=1)
    flat = ids.flatten().long()
    most = int(torch.bincount(flat[flat >= 0]).max())
    whole = run(probe, x, ids, w)
    assert probe.prefetched == 0  # one run: nothing to prefetch
    dual = DualExperts(experts, E, H, I, rates=ALL_TO_DEVICE, min_tokens=1,
                       buffer_bytes=probe.batch_bytes(3, 3 * most, torch.float32))
    got = run(dual, x, ids, w)
    assert dual.prefetched >= 2, dual.prefetched
    assert_matches(got, whole, 1e-6, "double-buffered runs")
    dual.learn()  # the step's record counts its runs and those copied while the one before computed
    assert (dual.history[-1]["runs"], dual.history[-1]["overlapped_runs"]) == (len(dual.last_runs), dual.prefetched)


def test_engine_times_of_a_call_that_ran_again_teach_nothing(layer):
    # A long step's engine call can run again before the step is learned from (a decode graph of
    # the same length replays it): its timestamps are then another job's, and the engine's rates
    # stay; the device's share still teaches.
    experts, _ = layer
    dual = DualExperts(experts, E, H, I, min_tokens=1)

    class Call:
        calls, engine_ns = 7, (2_000_000_000, 3_000_000_000)  # 1 s: far from the prediction

    class Events:
        def __init__(self):
            self.ended = Call()

        def query(self):
            return True

        def elapsed_time(self, _end):
            return 10.0  # ms

    step = {"cpu": 0.01, "cpu_measured": None, "t0": 1_000_000_000, "device": 0.001, "bucket": T.bit_length(),
            "rates": dual.rates, "call": Call(), "calls": 6, "events": (Events(), Events()), "recorded": True,
            "record": {"tokens": T}}
    dual._step = dict(step)
    dual.learn()  # a layer's first step of a length teaches nothing (first uses: compiling, ...)
    assert dual.rates_for(T) == dual.rates and len(dual.history) == 1
    dual._step = dict(step)
    dual.learn()
    got = dual.rates_for(T)
    assert got.cpu_bw == dual.rates.cpu_bw and got.h2d_bw < dual.rates.h2d_bw
    dual._step = dict(step, calls=7)  # the call's last run is this step's: its times count
    dual.learn()
    assert dual.rates_for(T).cpu_bw < dual.rates.cpu_bw
    dual.shared.by_bucket.clear()
    dual._step = dict(step, calls=7, recorded=False)  # an error before the end event: no device time
    dual.learn()
    assert dual.rates_for(T).h2d_bw == dual.rates.h2d_bw
    assert [(r["cpu_s"], r["device_s"]) for r in dual.history] == [(None, 0.01)] * 2 + [(1.0, 0.01), (1.0, None)]


def test_each_long_step_is_recorded_once_learned_from(layer):
    # The record tandem bench reads per chunk (bench/dual_split.py): the split, each side's bytes
    # and FLOPs as counted from the step's routing, and the engine's measured time; learning from
    # a step twice records it once. Here the device's time is not measured (no CUDA events off CUDA).
    experts, _ = layer
    dual = DualExperts(experts, E, H, I, rates=DualRates(cpu_bw=1e9, cpu_flops=1e12, h2d_bw=1e9), min_tokens=1)
    x = tokens(T, H, seed=14)
    ids, w = routing(T, E, K, seed=15)
    run(dual, x, ids, w)
    assert dual.history == collections.deque() and dual.steps_recorded == 0  # not yet learned from
    dual.learn()
    dual.learn()
    assert dual.steps_recorded == 1 and len(dual.history) == 1
    rec = dual.history[-1]
    counts = torch.bincount(ids.flatten().long(), minlength=E).tolist()
    taken = set(dual.last_split)
    assert 0 < len(taken) < sum(c > 0 for c in counts)  # both sides hold experts
    assert rec["tokens"] == T and rec["active"] == sum(c > 0 for c in counts)
    assert rec["device_experts"] == len(taken) and rec["device_bytes"] == len(taken) * dual.expert_bytes
    assert rec["cpu_bytes"] == (rec["active"] - len(taken)) * dual.expert_bytes
    assert rec["cpu_flops"] == sum(c for e, c in enumerate(counts) if e not in taken) * 6 * H * I
    assert rec["cpu_s"] > 0 and rec["cpu_predicted_s"] > 0
    assert rec["device_s"] is None if DEVICE == "cpu" else rec["device_s"] > 0


def test_bench_reads_each_chunk_summed_over_the_layers(layer):
    # tandem bench's split per chunk (bench/dual_split.py): two layers, two long steps each since
    # the mark (one before it is left out): per chunk, the layers' records summed.
    from tandem.bench import dual_split

    experts, _ = layer
    rates = DualRates(cpu_bw=1e9, cpu_flops=1e12, h2d_bw=1e9)
    # Each layer its own CpuExperts, as a model's layers have (on a GPU one stream call per
    # CpuExperts and length: two layers sharing it would find their calls run again since).
    model = torch.nn.ModuleList([DualExperts(CpuExperts(experts.engine, experts.layer, FMTS), E, H, I, rates=rates,
                                             min_tokens=1) for _ in range(2)])
    x = tokens(T, H, seed=16)
    ids, w = routing(T, E, K, seed=17)
    run(model[0], x, ids, w)  # before the mark: not the prompt's
    since = dual_split.mark(model)
    for n in (T, T // 2):
        for d in model:
            run(d, x[:n], ids[:n], w[:n])
    got = dual_split.chunks(model, since)
    assert [c["tokens"] for c in got] == [T, T // 2] and [c["layers"] for c in got] == [2, 2]
    recs = [list(d.history)[-2:] for d in model]
    for k, c in enumerate(got):
        for key in ("active", "device_experts", "cpu_bytes", "cpu_flops", "device_bytes"):
            assert c[key] == recs[0][k][key] + recs[1][k][key], key
        assert c["cpu_s"] == pytest.approx(recs[0][k]["cpu_s"] + recs[1][k]["cpu_s"]) and c["cpu_timed_layers"] == 2
    assert dual_split.chunks(model, dual_split.mark(model)) == []  # nothing ran since


def test_the_engine_starts_before_the_device_copies_are_queued(layer, monkeypatch):
    """The engine's job is submitted before any of the device's copies: queueing them first held
    the engine's start back by the host's time to queue them (~1.5 ms a V2-Lite layer)."""
    experts, held = layer
    dual = DualExperts(experts, E, H, I, rates=DualRates(), min_tokens=1, buffer_bytes=1)
    order = []
    submit, stage = experts.submit, dual._stage

    def engine_submit(*args):
        order.append("engine")
        return submit(*args)

    def device_stage(*args):
        order.append("copies")
        return stage(*args)

    monkeypatch.setattr(experts, "submit", engine_submit)
    monkeypatch.setattr(dual, "_stage", device_stage)
    x = tokens(T, H, seed=12)
    ids, w = routing(T, E, K, seed=13)
    got = run(dual, x, ids, w)
    assert 0 < len(dual.last_split) and order[0] == "engine" and order.count("copies") == len(dual.last_runs), order
    assert_matches(got, reference(x, ids, w, *held), ISA_VS_GENERIC["Q8_K"], "split")


def test_an_error_in_the_device_share_fails_the_step_only(layer, monkeypatch):
    experts, held = layer
    dual = DualExperts(experts, E, H, I, rates=ALL_TO_DEVICE, min_tokens=1)
    x = tokens(T, H, seed=10)
    ids, w = routing(T, E, K, seed=11)

    def broken(*args, **kwargs):
        raise RuntimeError("device share failed")

    monkeypatch.setattr("tandem.ops.reference.moe_experts_padded", broken)
    monkeypatch.setattr("tandem.ops.reference.moe_experts_grouped", broken)
    with pytest.raises(RuntimeError, match="device share failed"):
        run(dual, x, ids, w)
    monkeypatch.undo()
    dual.learn()  # the failed step's timers must not break the next one
    assert_matches(run(dual, x, ids, w), reference(x, ids, w, *held), 1e-4, "the step after a failed one")


def test_a_layer_stages_the_next_layers_first_run_ahead(layer, monkeypatch):
    # TANDEM_DUAL_PRESTAGE=1: a long step through layer A starts the copies of layer B's likely
    # first run: B's experts hottest in its last long step, as many as B's first run would hold
    # with A's counts in that order (PRESTAGE_MARGIN times larger). B's next long step takes that
    # run first (whatever its counts say) and copies only the rest. The output stays within the
    # engine's bound; the run is used once.
    from tandem.layers.dual_experts import PRESTAGE_MARGIN

    experts, held = layer
    monkeypatch.setenv("TANDEM_DUAL_PRESTAGE", "1")
    a = DualExperts(experts, E, H, I, rates=DualRates(), min_tokens=1, buffer_bytes=1)
    b = DualExperts(experts, E, H, I, rates=DualRates(), min_tokens=1, buffer_bytes=1)
    a.next_layer = b
    for layer_ in (a, b):  # fixed rates: on a GPU learned ones would move the split under the checks below
        monkeypatch.setattr(layer_, "learn", lambda: None)
    x = tokens(T, H, seed=12)
    ids, w = routing(T, E, K, seed=13)
    ids2, w2 = routing(T, E, K, seed=14)
    grouped = grouped_mm_supported(torch.float32, torch.device(DEVICE), H, I)

    def counted(ids_):
        flat = ids_.flatten().long()
        return torch.bincount(flat[flat >= 0], minlength=E).tolist()

    run(a, x, ids, w)
    assert b._ahead is None  # B has no long step yet: nothing to predict
    run(b, x, ids2, w2)
    assert b.rank[0] == max(range(E), key=lambda e: counted(ids2)[e])
    run(a, x, ids, w)
    # What A staged for B, worked out by hand: A's counts laid on B's ranking, then B's split.
    likely = [0] * E
    for e, c in zip(b.rank, sorted(counted(ids), reverse=True)):
        likely[e] = c
    taken = split(likely, b.expert_bytes, b.flops_per_token, b.rates_for(T))
    assert taken and min(likely[e] for e in taken) >= max(likely[e] for e in range(E) if e not in taken)  # B's hottest
    first = b.batches(taken, [int(c * PRESTAGE_MARGIN) + 1 for c in likely], torch.float32, grouped)[0]
    assert b._ahead is not None and b._ahead[0] == first
    got = run(b, x, ids, w)  # other routing than B's last step: the staged run is still taken first
    assert b.prestaged == 1 and b.last_split[: len(first)] == first and b._ahead is None
    assert_matches(got, reference(x, ids, w, *held).float(), ISA_VS_GENERIC["Q8_K"], "prestaged run")
    # A staged run that no longer fits the buffer with the new counts is let go, not used.
    b.buffer_bytes = b.batch_bytes(3, 3 * T, torch.float32)
    run(a, x, ids, w)
    assert b._ahead is not None and len(b._ahead[0]) > 1
    b.buffer_bytes = 1
    run(b, x, ids2, w2)
    assert b.prestaged == 1 and b._ahead is None
    # A step of another length stages a run sized for its own counts.
    short = T // 2
    run(a, x[:short], ids[:short], w[:short])
    assert b._ahead is not None
    got = run(b, x[:short], ids2[:short], w2[:short])
    assert b.prestaged == 2
    assert_matches(got, reference(x[:short], ids2[:short], w2[:short], *held).float(), ISA_VS_GENERIC["Q8_K"],
                   "prestaged run, shorter step")
    monkeypatch.setenv("TANDEM_DUAL_PRESTAGE", "0")
    run(a, x, ids, w)
    assert b._ahead is None  # off: nothing staged
    # Unset: only steps of at least PRESTAGE_MIN_TOKENS stage ahead.
    monkeypatch.delenv("TANDEM_DUAL_PRESTAGE")
    monkeypatch.setattr("tandem.layers.dual_experts.PRESTAGE_MIN_TOKENS", T)
    run(a, x[:short], ids[:short], w[:short])
    assert b._ahead is None
    run(a, x, ids, w)
    assert b._ahead is not None
    b.drop_ahead()


def test_runs_go_by_expert_id_and_neighbours_copy_at_once(layer):
    """Each run holds its experts by id, and the copies take stretches of neighbouring experts at
    once (their slabs lie in id order): the staged blocks are those of per-expert copies."""
    from tandem.layers.dual_copies import stretches

    assert stretches([2, 3, 4, 7, 0, 1, 5]) == [(0, 2, 3), (3, 7, 1), (4, 0, 2), (6, 5, 1)]
    assert stretches([]) == [] and stretches([6, 5]) == [(0, 6, 1), (1, 5, 1)]
    experts, _ = layer
    counts = [9, 1, 7, 3, 8, 2, 6, 4]
    dual = DualExperts(experts, E, H, I)
    dual.buffer_bytes = dual.batch_bytes(3, 3 * max(counts), torch.float32)  # three padded experts a run
    runs = dual.batches([0, 4, 2, 6, 7, 3, 5, 1], counts, torch.float32)  # hottest first
    assert runs == [[0, 2, 4], [3, 6, 7], [1, 5]]
    chosen = [1, 2, 3, 6, 0]
    staged, _ = dual._stage(chosen, torch.device(DEVICE))
    for (n, proj), blocks in staged.items():
        slab = dual.slabs[n][proj][0]
        assert torch.equal(blocks.cpu(), slab[chosen]), proj


@pytest.mark.skipif(DEVICE != "cuda", reason="copies from page-locked slabs: CUDA only")
def test_page_locked_slabs_copy_in_one_driver_call(layer):
    """Slabs register_slabs page-locked go through ops.cuda_host.copy_batch (raw addresses, one
    driver call a run): the staged blocks are those experts' rows, stretches of neighbours
    included (here the slabs are copied into page-locked memory, as the engine's large ones are
    registered in place)."""
    from tandem.ops import cuda_host

    experts, _ = layer
    dual = DualExperts(experts, E, H, I)
    dual._registered = True  # the test's slabs are small: pinned copies stand in for registered ones
    dual.slabs = [{p: (slab.pin_memory(), info) for p, (slab, info) in node.items()} for node in dual.slabs]
    dual._locked = {slab.data_ptr() for node in dual.slabs for slab, _ in node.values()}
    issued = []
    real = cuda_host.copy_batch
    chosen = [1, 2, 3, 6, 0]
    try:
        cuda_host.copy_batch = lambda copies, stream: issued.append(len(copies)) or real(copies, stream)
        staged, done = dual._stage(chosen, torch.device("cuda"))
    finally:
        cuda_host.copy_batch = real
    torch.cuda.current_stream().wait_event(done)
    assert issued == [3 * 3 * len(dual.slabs)]  # one call: projections (per node) x stretches [1, 2, 3], [6], [0]
    for (n, proj), blocks in staged.items():
        assert torch.equal(blocks.cpu(), dual.slabs[n][proj][0][chosen]), proj


def test_device_weights_are_the_file_weights_of_those_experts(layer):
    """Hot experts take their float copies from the engine's memory (DualExperts.device_weights):
    the file's weights of exactly those experts, in their order, in the asked dtype."""
    experts, held = layer
    dual = DualExperts(experts, E, H, I)
    ids = [5, 0, 3]
    got = dual.device_weights(ids, torch.float32, DEVICE)
    assert joined_halves(got[0], got[1]) is not None  # one tensor: a run's grouped matmuls take both at once
    for proj, g, want in zip(("gate", "up", "down"), got, held):
        want = want[ids].float()
        assert g.shape == want.shape and g.device.type == DEVICE, proj
        err = float((g.cpu() - want).abs().max())
        assert err <= (2.0**-22 * float(want.abs().max()) if DEVICE == "cuda" else 0.0), proj
    bf = dual.device_weights([2], torch.bfloat16, DEVICE)
    assert all(t.dtype == torch.bfloat16 for t in bf)
    assert torch.equal(bf[0].cpu(), held[0][[2]].float().to(torch.bfloat16)) or DEVICE == "cuda"


def test_prepared_counts_give_the_same_split_and_output(layer, monkeypatch):
    """prepare (the MoE block's shared experts queued before submit's routing sync) copies the token
    counts ahead on a GPU and submit waits for that copy alone: the same split and output as a
    submit unprepared. Off a GPU, or with the switch off, prepare queues nothing."""
    experts, _ = layer
    monkeypatch.setenv("TANDEM_SHARED_FIRST", "1")
    x = tokens(T, H, seed=21).to(DEVICE)
    ids, w = (t.to(DEVICE) for t in routing(T, E, K, "padded", seed=22))
    outs, splits = [], []
    for prepared in (False, True):
        dual = DualExperts(experts, E, H, I, rates=DualRates(), min_tokens=1)
        if prepared:
            assert dual.prepare(x, ids) == (DEVICE == "cuda")
            y = x * 1.0  # other work queued between prepare and submit (the shared experts' place)
        outs.append(dual.wait(dual.submit(x, ids, w)).cpu())
        splits.append(list(dual.last_split))
        assert dual._prepared is None  # consumed by submit
    assert splits[0] == splits[1] and 0 < len(splits[0]), splits
    assert_matches(outs[1], outs[0], 1e-5, "prepared against unprepared")  # the device's sums use atomics
    del y
    monkeypatch.setenv("TANDEM_SHARED_FIRST", "0")
    assert not DualExperts(experts, E, H, I, min_tokens=1).prepare(x, ids)
