"""The CPU expert engine's generic kernels (tandem.ops.cpu, isa="generic": the spec that every ISA
kernel is tested against in test_cpu_isa.py) with the online formats BF16, INT8, INT4 vs the torch
reference MoE. Tolerances (relative to max |ref|): TOL_F32 = 2e-5 with float32 output and
TOL_BF16 = 8e-3 with bfloat16 output, on the weights the format holds (the numpy quantizers
of moe_cases); and, against the unquantized weights, 1% for BF16, 3% for INT8, 25% for INT4."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.ops import cpu
from tests.ops.moe_cases import (
    TOL_BF16,
    TOL_F32,
    assert_matches,
    dense_weights,
    dequant_ref,
    reference,
    rel_err,
    routing,
    tokens,
)

# Shapes per format: H and I are not powers of two; INT4 needs multiples of its 64-weight group.
SHAPES = {"BF16": (6, 72, 136), "INT8": (6, 72, 136), "INT4": (6, 320, 192)}  # E, I, H
QUANT_ERR = {"BF16": 0.01, "INT8": 0.03, "INT4": 0.25}


@pytest.fixture(scope="module")
def engine():
    return cpu.create_engine(n_threads=2, isa="generic")


@pytest.fixture(scope="module")
def layers(engine):
    """fmt -> (layer id, the weights it was built from, the weights it holds)."""
    out = {}
    for fmt, (E, I, H) in SHAPES.items():
        w = dense_weights(E, I, H, seed=len(out))
        out[fmt] = (cpu.add_layer(engine, fmt, *w), w, tuple(dequant_ref(fmt, t) for t in w))
    return out


@pytest.mark.parametrize("fmt", list(SHAPES))
@pytest.mark.parametrize("T,k", [(1, 1), (3, 2), (17, 8), (256, 4)])
def test_online_formats_match_reference(engine, layers, fmt, T, k):
    layer, dense, held = layers[fmt]
    E, I, H = SHAPES[fmt]
    x = tokens(T, H, seed=T)
    ids, w = routing(T, E, k, seed=k)
    out = cpu.wait(engine, cpu.submit(engine, layer, x, ids, w))
    assert out.dtype == torch.float32 and out.shape == (T, H)
    assert_matches(out, reference(x, ids, w, *held), TOL_F32, fmt)
    # The quantizer is sane, not merely consistent with its numpy mirror.
    assert rel_err(out, reference(x, ids, w, *dense)) < QUANT_ERR[fmt]


@pytest.mark.parametrize("k", range(1, 9))
def test_every_k(engine, layers, k):
    layer, _, held = layers["BF16"]
    E, I, H = SHAPES["BF16"]
    x = tokens(17, H)
    ids, w = routing(17, E, k, seed=10 + k)
    assert_matches(cpu.wait(engine, cpu.submit(engine, layer, x, ids, w)), reference(x, ids, w, *held), TOL_F32)


@pytest.mark.parametrize("fmt", list(SHAPES))
@pytest.mark.parametrize("kind", ["one", "padded", "few"])
def test_skewed_routing(engine, layers, fmt, kind):
    layer, _, held = layers[fmt]
    E, I, H = SHAPES[fmt]
    x = tokens(33, H)
    ids, w = routing(33, E, 3, kind=kind, seed=3)
    out = cpu.wait(engine, cpu.submit(engine, layer, x, ids, w))
    assert_matches(out, reference(x, ids, w, *held), TOL_F32, kind)


def test_padding_only_gives_zeros(engine, layers):
    layer, _, _ = layers["INT8"]
    H = SHAPES["INT8"][2]
    ids = torch.full((5, 2), -1, dtype=torch.int32)
    out = cpu.wait(engine, cpu.submit(engine, layer, tokens(5, H), ids, torch.ones(5, 2)))
    assert torch.equal(out, torch.zeros(5, H))


def test_no_tokens(engine, layers):
    layer, _, _ = layers["BF16"]
    H = SHAPES["BF16"][2]
    ids = torch.empty(0, 2, dtype=torch.int32)
    out = cpu.wait(engine, cpu.submit(engine, layer, torch.empty(0, H), ids, torch.empty(0, 2)))
    assert out.shape == (0, H)


@pytest.mark.parametrize("fmt", list(SHAPES))
def test_bfloat16_in_and_out(engine, layers, fmt):
    layer, _, held = layers[fmt]
    E, I, H = SHAPES[fmt]
    x = tokens(17, H, dtype=torch.bfloat16)
    ids, w = routing(17, E, 4)
    ref = reference(x, ids, w, *held)
    out = cpu.wait(engine, cpu.submit(engine, layer, x, ids, w))
    assert out.dtype == torch.bfloat16
    assert_matches(out.float(), ref, TOL_BF16, fmt)
    out32 = cpu.wait(engine, cpu.submit(engine, layer, x, ids, w, out_dtype=torch.float32))
    assert out32.dtype == torch.float32
    assert_matches(out32, ref, TOL_F32, fmt)


@pytest.mark.parametrize("fmt", list(SHAPES))
def test_bfloat16_weights(engine, fmt):
    E, I, H = SHAPES[fmt]
    dense = dense_weights(E, I, H, seed=7, dtype=torch.bfloat16)
    layer = cpu.add_layer(engine, fmt, *dense)
    held = tuple(dequant_ref(fmt, t) for t in dense)
    x = tokens(9, H)
    ids, w = routing(9, E, 2)
    assert_matches(cpu.wait(engine, cpu.submit(engine, layer, x, ids, w)), reference(x, ids, w, *held), TOL_F32, fmt)


def test_mixed_online_formats(engine):
    E, I, H = 4, 128, 192
    dense = dense_weights(E, I, H, seed=5)
    fmts = ("INT4", "BF16", "INT8")
    layer = cpu.add_layer(engine, fmts, *dense)
    assert engine.layer_info(layer)["formats"] == fmts
    held = tuple(dequant_ref(f, t) for f, t in zip(fmts, dense))
    x = tokens(17, H)
    ids, w = routing(17, E, 2)
    assert_matches(cpu.wait(engine, cpu.submit(engine, layer, x, ids, w)), reference(x, ids, w, *held), TOL_F32)


def test_memory_per_format(engine, layers):
    for fmt, (E, I, H) in SHAPES.items():
        per_row = {"BF16": 2 * H, "INT8": 4 + H, "INT4": H // 64 * 36}[fmt]
        per_row_down = {"BF16": 2 * I, "INT8": 4 + I, "INT4": I // 64 * 36}[fmt]
        assert engine.layer_info(layers[fmt][0])["bytes"] == E * (2 * I * per_row + H * per_row_down)


def test_results_do_not_depend_on_thread_count(layers):
    _, dense, _ = layers["INT4"]
    E, I, H = SHAPES["INT4"]
    x = tokens(64, H)
    ids, w = routing(64, E, 4)
    outs = []
    for n in (1, 2, 3):
        e = cpu.create_engine(n_threads=n, numa_nodes=[sorted(os.sched_getaffinity(0))], isa="generic")
        layer = cpu.add_layer(e, "INT4", *dense)
        outs.append(cpu.wait(e, cpu.submit(e, layer, x, ids, w)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_inputs_are_copied_at_submit(engine, layers):
    layer, _, held = layers["BF16"]
    E, I, H = SHAPES["BF16"]
    x = tokens(40, H)
    ids, w = routing(40, E, 3)
    ref = reference(x, ids, w, *held)
    h = cpu.submit(engine, layer, x, ids, w)
    x.zero_(), ids.fill_(0), w.zero_()  # the caller reuses its buffers at once
    assert_matches(cpu.wait(engine, h), ref, TOL_F32)


_ROWS_RUN = """
import sys, torch
sys.path.insert(0, {root!r})
from tandem.ops import cpu
from tests.ops.moe_cases import dense_weights, routing, tokens
e = cpu.create_engine(n_threads=3, isa="generic")
layer = cpu.add_layer(e, "INT8", *dense_weights(6, 320, 192, seed=5))
outs = [cpu.wait(e, cpu.submit(e, layer, tokens(T, 192, seed=T), *routing(T, 6, 2, seed=T))) for T in (1, 5)]
torch.save(outs, {path!r})
"""


def test_results_do_not_depend_on_decode_task_rows(tmp_path):
    """Decode tasks of 16, 48 (I = 320 in 7 tasks, the last partial), the automatic rule's rows and
    one task per expert (TANDEM_DECODE_ROWS, read once per process: a fresh interpreter each) give
    the same bits: a task's rows are computed alone and each token's positions summed in one order."""
    root = str(Path(__file__).resolve().parents[2])
    outs = []
    for rows in (None, "16", "48", "4096"):
        path = tmp_path / f"out_{rows}.pt"
        env = {k: v for k, v in os.environ.items() if k != "TANDEM_DECODE_ROWS"}
        if rows is not None:
            env["TANDEM_DECODE_ROWS"] = rows
        done = subprocess.run([sys.executable, "-c", _ROWS_RUN.format(root=root, path=str(path))],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(torch.load(path))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
