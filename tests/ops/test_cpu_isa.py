"""Every ISA's kernels (AVX2, AVX-512, AMX) against the generic ones on the same weights and inputs:
within the format's activation-quantization bound of the generic output (ISA_VS_GENERIC), and
within ~1e-3 of an emulation of the very roundings the ISA applies (isa_cases.emulate), which
catches a wrong scale that the quantization noise would hide. Each ISA skips cleanly where the CPU
or the build lacks it; the AMX cases carry the `amx` mark."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.ops import cpu
from tests.ops.isa_cases import ISA_VS_EMULATION, ISA_VS_GENERIC, emulate, usable_isas
from tests.ops.moe_cases import assert_matches, dense_weights, dequant_ref, gguf_blocks, rel_err, routing, tokens

ONLINE = ("BF16", "INT8", "INT4")
# E (odd), I, H per format: partial row groups (I, H not multiples of 16) and odd K where the
# format allows any K (BF16, INT8 pad K inside their layout).
SHAPES = {
    "BF16": (5, 36, 100),
    "INT8": (7, 72, 100),
    "INT4": (5, 320, 192),
    "Q8_0": (7, 160, 96),
    "Q5_0": (5, 160, 96),
    "Q4_K": (5, 256, 768),
    "Q5_K": (3, 512, 256),
    "Q6_K": (5, 256, 768),
}
MIXES = {"Q4_K_M": ("Q4_K", "Q4_K", "Q6_K"), "V2-Lite Q4_K_M": ("Q4_K", "Q4_K", "Q8_0")}


def isa_param(isa):
    marks = [pytest.mark.amx] if isa == "amx" else []
    return pytest.param(isa, marks=marks, id=isa)


ISAS = [isa_param(i) for i in ("avx2", "avx512", "amx", "amx-emu")]


def need(isa):
    info = cpu.isa_info()
    if isa not in info["built"]:
        pytest.skip(f"this build has no {isa} kernels")
    if isa not in info["cpu"]:
        pytest.skip(f"this CPU (or OS) does not support {isa}")


def layer_sources(fmts, E, I, H, seed=0):
    """Weights for add_layer and the float32 weights the generic kernels compute with."""
    if fmts[0] in ONLINE:
        dense = dense_weights(E, I, H, seed=seed)
        return dense, tuple(dequant_ref(f, t) for f, t in zip(fmts, dense))
    shapes = ((E, I, H), (E, I, H), (E, H, I))
    pairs = [gguf_blocks(f, *s, seed=seed + i) for i, (f, s) in enumerate(zip(fmts, shapes))]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


_CACHE: dict = {}


def engines(isa):
    """(generic engine, isa engine), shared across tests."""
    if isa not in _CACHE:
        _CACHE[isa] = cpu.create_engine(n_threads=2, isa=isa)
    if "generic" not in _CACHE:
        _CACHE["generic"] = cpu.create_engine(n_threads=2, isa="generic")
    return _CACHE["generic"], _CACHE[isa]


def run_both(isa, fmts, E, I, H, T, k, kind="random", x_dtype=torch.float32, seed=0):
    gen, eng = engines(isa)
    src, held = layer_sources(fmts, E, I, H, seed=seed)
    lg, li = cpu.add_layer(gen, fmts, *src), cpu.add_layer(eng, fmts, *src)
    x = tokens(T, H, seed=T + seed, dtype=x_dtype)
    ids, w = routing(T, E, k, kind=kind, seed=k + seed)
    ref = cpu.wait(gen, cpu.submit(gen, lg, x, ids, w, out_dtype=torch.float32))
    out = cpu.wait(eng, cpu.submit(eng, li, x, ids, w, out_dtype=torch.float32))
    emu = emulate(eng, x, ids, w, held, fmts)
    return out, ref, emu, eng


def bound(eng, fmts) -> float:
    """The loosest activation layout among the projections' kernels decides the bound."""
    info = eng.kernel_info()
    kinds = {info[f]["act"] for f in fmts} | {info[f].get("big_act", info[f]["act"]) for f in fmts}
    return max(ISA_VS_GENERIC[k] for k in kinds)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(SHAPES))
@pytest.mark.parametrize("T,k", [(1, 1), (3, 2), (17, 4), (256, 3)])
def test_isa_matches_generic(isa, fmt, T, k):
    need(isa)
    E, I, H = SHAPES[fmt]
    fmts = (fmt,) * 3
    out, ref, emu, eng = run_both(isa, fmts, E, I, H, T, k)
    assert_matches(out, emu, ISA_VS_EMULATION, f"{isa} {fmt} vs emulation")
    assert_matches(out, ref, bound(eng, fmts), f"{isa} {fmt} vs generic")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["INT8", "Q5_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("kind", ["one", "padded", "few"])
def test_isa_skewed_routing(isa, fmt, kind):
    """All tokens on one expert (the prefill kernels' case), padding slots, repeated experts."""
    need(isa)
    E, I, H = SHAPES[fmt]
    out, ref, emu, eng = run_both(isa, (fmt,) * 3, E, I, H, 40, 3, kind=kind, x_dtype=torch.bfloat16)
    assert_matches(out, emu, ISA_VS_EMULATION, f"{isa} {fmt} {kind} vs emulation")
    assert_matches(out, ref, bound(eng, (fmt,) * 3), f"{isa} {fmt} {kind}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mix", list(MIXES))
def test_isa_q4_k_m_mixes(isa, mix):
    need(isa)
    fmts = MIXES[mix]
    E, I, H = (7, 512, 256) if fmts[2] == "Q6_K" else (5, 352, 256)
    for T, k in ((1, 6), (64, 6)):
        out, ref, emu, eng = run_both(isa, fmts, E, I, H, T, k, seed=T)
        assert_matches(out, emu, ISA_VS_EMULATION, f"{isa} {mix} T={T} vs emulation")
        assert_matches(out, ref, bound(eng, fmts), f"{isa} {mix} T={T}")


@pytest.mark.parametrize("isa", ISAS)
def test_isa_prefill_kernels_run(isa):
    """Enough tokens per expert that the ISA's `big` kernels (AMX tiles) serve every format."""
    need(isa)
    _, eng = engines(isa)
    info = eng.kernel_info()
    for fmt in ("INT8", "BF16", "INT4", "Q4_K"):
        E, I, H = 3, 64 if fmt != "Q4_K" else 256, 256
        out, ref, emu, _ = run_both(isa, (fmt,) * 3, E, I, H, 96, 2)
        if "big_path" in info[fmt]:
            assert 96 * 2 // E >= info[fmt]["big_min"]
        assert_matches(out, emu, ISA_VS_EMULATION, f"{isa} {fmt} prefill vs emulation")
        assert rel_err(out, ref) < bound(eng, (fmt,) * 3)


@pytest.mark.parametrize("isa", ISAS)
def test_isa_fake_two_nodes(isa):
    """NUMA slices (an injected two-node topology) give each node a part of I to pack."""
    need(isa)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two cpus to inject a two-node topology")
    fmts = MIXES["Q4_K_M"]
    src, _ = layer_sources(fmts, 4, 512, 256)
    one = cpu.create_engine(n_threads=2, numa_nodes=[cpus], isa=isa)
    two = cpu.create_engine(n_threads=2, numa_nodes=[[cpus[0]], [cpus[1]]], isa=isa)
    l1, l2 = cpu.add_layer(one, fmts, *src), cpu.add_layer(two, fmts, *src)
    x = tokens(17, 256)
    ids, w = routing(17, 4, 3, kind="padded")
    out1 = cpu.wait(one, cpu.submit(one, l1, x, ids, w))
    out2 = cpu.wait(two, cpu.submit(two, l2, x, ids, w))
    # Each node quantizes its own slice of h: one int8 step apart at most.
    assert_matches(out2, out1, ISA_VS_EMULATION, "2 nodes vs 1")


@pytest.mark.parametrize("isa", ISAS)
def test_isa_results_do_not_depend_on_thread_count(isa):
    need(isa)
    fmts = ("Q4_K", "Q4_K", "Q6_K")
    src, _ = layer_sources(fmts, 5, 256, 512)
    x = tokens(40, 512)
    ids, w = routing(40, 5, 3)
    outs = []
    for n in (1, 2, 3):
        e = cpu.create_engine(n_threads=n, numa_nodes=[sorted(os.sched_getaffinity(0))], isa=isa)
        layer = cpu.add_layer(e, fmts, *src)
        outs.append(cpu.wait(e, cpu.submit(e, layer, x, ids, w)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("isa", ISAS)
def test_isa_memory_is_the_file_size(isa):
    """The tiled layout keeps the file's bytes: a group of R full rows takes R rows' bytes, plus at
    most 63 bytes of padding to keep the next group 64-byte aligned."""
    need(isa)
    _, eng = engines(isa)
    fmts = MIXES["Q4_K_M"]
    E, I, H = 2, 512, 256
    src, _ = layer_sources(fmts, E, I, H)
    info = eng.layer_info(cpu.add_layer(eng, fmts, *src))
    R = info["row_group"]
    assert R == (8 if isa == "avx2" else 16)
    file_bytes = sum(t.numel() for t in src)
    groups = E * (2 * I // R + H // R)
    assert file_bytes <= info["bytes"] <= file_bytes + 63 * groups


def test_usable_isas_are_reported():
    info = cpu.isa_info()
    assert set(usable_isas()) <= set(info["cpu"]) & set(info["built"])
    for isa in usable_isas():
        assert cpu.create_engine(n_threads=1, isa=isa).isa == isa


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["INT8", "BF16", "INT4", "Q4_K"])
def test_isa_many_tokens_on_one_expert(isa, fmt):
    """More tokens on one expert than a tile kernel's token block (256): the blocks must chain."""
    need(isa)
    E, I, H = 3, 48 if fmt in ("INT8", "BF16") else 256, 256
    out, ref, emu, eng = run_both(isa, (fmt,) * 3, E, I, H, 300, 2, kind="one")
    assert_matches(out, emu, ISA_VS_EMULATION, f"{isa} {fmt} 600 tokens on one expert vs emulation")
    assert_matches(out, ref, bound(eng, (fmt,) * 3), f"{isa} {fmt} 600 tokens on one expert")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["INT8", "BF16", "INT4", "Q4_K"])
def test_isa_prefill_task_rows_do_not_change_results(isa, fmt):
    """Prefill tasks of 64..512 rows (and the automatic choice) split the same sums differently
    across workers only: every output is the same bits. Widths that are not a multiple of the
    task's rows leave a partial last task."""
    need(isa)
    E, I, H = (3, 320, 256) if fmt != "Q4_K" else (3, 512, 768)
    src, _ = layer_sources((fmt,) * 3, E, I, H)
    x = tokens(72, H)
    ids, w = routing(72, E, 2)
    eng = cpu.create_engine(n_threads=2, isa=isa)
    layer = cpu.add_layer(eng, (fmt,) * 3, *src)
    assert "big_path" in eng.kernel_info()[fmt] or isa != "amx-emu"
    outs = []
    for rows in (0, 64, 128, 256, 512):
        eng.prefill_rows = rows
        assert eng.prefill_rows == rows
        outs.append(cpu.wait(eng, cpu.submit(eng, layer, x, ids, w)))
    for rows, out in zip((64, 128, 256, 512), outs[1:]):
        assert torch.equal(out, outs[0]), f"{isa} {fmt}: prefill_rows={rows} changed the output"


@pytest.mark.parametrize("isa", ISAS)
def test_isa_v2_lite_q4_k_m_prefill_tasks(isa):
    """DeepSeek-V2-Lite's Q4_K_M experts at their real H and I (2048, 1408: Q8_0 down with
    K = 22 * 64, no multiple of 256; 1408 rows leave a partial last task of 128 at 256 rows) through
    the prefill kernels at each task size moe_cpu.py compares, bf16 in and out as its host calls use
    them: the same bits at every size, within the bound of the generic kernels."""
    need(isa)
    fmts = MIXES["V2-Lite Q4_K_M"]
    E, I, H, T = 2, 1408, 2048, 24
    src, _ = layer_sources(fmts, E, I, H)
    gen, _ = engines(isa)
    eng = cpu.create_engine(n_threads=2, isa=isa)
    layer, lg = cpu.add_layer(eng, fmts, *src), cpu.add_layer(gen, fmts, *src)
    x = tokens(T, H, dtype=torch.bfloat16)
    ids, w = routing(T, E, 2)  # every token on both experts: 24 rows each, the prefill kernels
    ref = cpu.wait(gen, cpu.submit(gen, lg, x, ids, w, out_dtype=torch.float32))
    outs = []
    for rows in (64, 128, 256):
        eng.prefill_rows = rows
        outs.append(cpu.wait(eng, cpu.submit(eng, layer, x, ids, w, out_dtype=torch.float32)))
    for rows, out in zip((128, 256), outs[1:]):
        assert torch.equal(out, outs[0]), f"{isa}: prefill_rows={rows} changed the output"
    assert_matches(outs[0], ref, bound(eng, fmts), f"{isa} V2-Lite Q4_K_M prefill")


def test_prefill_rows_are_checked():
    eng = cpu.create_engine(n_threads=1, isa="generic")
    for bad in (32, 100):
        with pytest.raises(ValueError, match="prefill_rows must be 0"):  # the engine's check
            eng.prefill_rows = bad
    for bad in (-64, 2048, 64.0):
        with pytest.raises(ValueError, match=r"prefill_rows must be an int in \[0, 1024\]"):  # ops.cpu's
            eng.prefill_rows = bad
    assert eng.prefill_rows == 0


@pytest.mark.parametrize("isa", [isa_param("amx"), isa_param("amx-emu")])
def test_amx_int4_bf16_path_still_matches(isa):
    """TANDEM_AMX_INT4=bf16 (read when the kernel table is built, so in a fresh process) keeps
    INT4 prefill on the dequantized bf16 tiles, within the same bounds as the int8 path."""
    need(isa)
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from tests.ops.test_cpu_isa import run_both, bound, ISA_VS_EMULATION;"
        "from tests.ops.moe_cases import rel_err;"
        f"out, ref, emu, eng = run_both('{isa}', ('INT4',) * 3, 3, 256, 256, 96, 2);"
        "print(eng.kernel_info()['INT4']['big_path'], rel_err(out, emu) < ISA_VS_EMULATION,"
        " rel_err(out, ref) < bound(eng, ('INT4',) * 3))"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TANDEM_AMX_INT4="bf16")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "amx-bf16 (dequantized) True True", done.stdout


_AB_CODE = """
import sys, torch
sys.path.insert(0, '.')
from tandem.ops import cpu
from tests.ops.test_cpu_isa import MIXES, layer_sources
from tests.ops.moe_cases import routing, tokens
outs = []
for isa, fmts, T in (({isa!r}, MIXES['V2-Lite Q4_K_M'], 40), ({isa!r}, ('INT8',) * 3, 40), ({isa!r}, ('BF16',) * 3, 3)):
    E, I, H = 3, 320, 512
    src, _ = layer_sources(fmts, E, I, H)
    eng = cpu.create_engine(n_threads=2, isa=isa)
    layer = cpu.add_layer(eng, fmts, *src)
    ids, w = routing(T, E, 2, kind='padded')
    for x in (tokens(T, H), tokens(T, H, dtype=torch.bfloat16)):
        outs.append(cpu.wait(eng, cpu.submit(eng, layer, x, ids, w)))
torch.save(outs, sys.argv[1])
"""


@pytest.mark.parametrize("isa", [isa_param("amx"), isa_param("amx-emu"), isa_param("avx512")])
def test_ab_switches_give_the_same_bits(isa, tmp_path):
    """TANDEM_SPLIT_DOWN=0 (down tasks of rows over every expert), TANDEM_FLOW=0 (decode jobs on
    phase barriers) and TANDEM_AMX_OVERLAP=1 (the next bf16 panel expanded during the block
    before's tiles, not each one before its own) are benchmark switches: the sums keep their order, so every output is the
    same bits as with the defaults (prefill rows: 40 tokens on 3 experts; decode: 3 tokens)."""
    need(isa)
    root = Path(__file__).resolve().parents[2]
    runs = {}
    switches = {"TANDEM_SPLIT_DOWN": "0", "TANDEM_FLOW": "0", "TANDEM_AMX_OVERLAP": "1"}
    for name, extra in (("default", {}), ("switched", switches)):
        env = {k: v for k, v in os.environ.items() if k not in switches}
        path = tmp_path / f"{name}.pt"
        done = subprocess.run([sys.executable, "-c", _AB_CODE.format(isa=isa), str(path)], cwd=root,
                              env=dict(env, **extra), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = torch.load(path)
    assert len(runs["default"]) == 6
    for i, (a, b) in enumerate(zip(runs["default"], runs["switched"])):
        assert torch.equal(a, b), f"{isa} case {i}: the switches changed the output"


@pytest.mark.parametrize("isa", [isa_param("amx"), isa_param("amx-emu")])
def test_amx_scratch_holds_both_panels_when_only_one_projection_has_them(isa):
    """AMX prefill expands block-scaled rows into two bf16 panels only for K <= 3072, so a layer
    whose H and I fall on either side (Qwen2-57B: 3584 / 2560; here 3104 / 3072) needs the larger scratch of the
    two, not that of max(H, I): a worker's scratch was overrun (heap corruption, caught on
    amx-emu). In a fresh process: such a layer both ways round, against the generic kernels."""
    need(isa)
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from tests.ops.test_cpu_isa import run_both, bound;"
        "from tests.ops.moe_cases import rel_err;"
        f"a = run_both('{isa}', ('Q8_0',) * 3, 2, 3072, 3104, 16, 2);"
        f"b = run_both('{isa}', ('Q8_0',) * 3, 2, 3104, 3072, 16, 2);"
        "print(all(rel_err(o, r) < bound(e, ('Q8_0',) * 3) for o, r, _, e in (a, b)))"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True", done.stdout
