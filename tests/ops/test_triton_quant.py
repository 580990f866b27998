"""Triton kernels on GGUF blocks (tandem.ops.triton.quant) against the numpy codecs (tandem.weights.quant).

Without CUDA the kernels run in Triton's interpreter on CPU tensors; with CUDA, compiled on the
GPU. Weights get a random scale and offset per 16 columns, so every sub-block of a K-quant has its
own scale and min: a kernel that reads the wrong one fails. Bounds:
- dequantize / embedding: bit-equal in fp32 (the kernels round as the numpy codecs do).
- matmul, fp32 x: |y - ref| <= 1e-5 max|ref| (fp32 accumulation order only; ref in float64).
- matmul, bf16/fp16 x: |y - ref| <= u (|x| @ |W|^T + |ref|) elementwise, u = 2^-9 for bf16: the
  tensor-core paths round each weight to bf16 (relative error <= u) and y is rounded once to bf16.
  Triton 3.6's interpreter converts fp32 -> bf16 by truncation, not to nearest: u = 2^-8 there,
  and bf16 dequantization is within one bf16 step of torch's (bit-equal on the GPU).
Shapes stay tiny: the interpreter runs every program in numpy.
"""

import functools
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Chosen when tandem.ops.triton.quant defines its kernels, so before that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.errors import TandemError
from tandem.layers.quant_linear import QuantEmbedding, QuantLinear
from tandem.ops.triton import quant as tq
from tandem.weights import quant as wq

FORMATS = ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]
N, K = 64, 512
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]
BF16_TRUNCATES = tq._INTERPRETED  # see the module docstring
UNIT = {torch.bfloat16: 2.0 ** (-8 if BF16_TRUNCATES else -9), torch.float16: 2.0**-11}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@functools.cache
def quantized(fmt: str, n: int = N, k: int = K, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(blocks uint8 [n, row_bytes], their numpy dequantization float32 [n, k])."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k // 16, 16)).astype(np.float32)
    w *= np.exp(rng.uniform(-2, 2, (n, k // 16, 1))).astype(np.float32)  # scales 1/7x .. 7x per 16
    w += rng.uniform(-3, 3, (n, k // 16, 1)).astype(np.float32)  # some groups all positive: mins differ
    blocks = wq.quantize(w.reshape(n, k), fmt)
    return blocks, wq.dequantize(blocks, fmt, (n, k))


def tensors(fmt, device, n=N, k=K, seed=0):
    blocks, ref = quantized(fmt, n, k, seed)
    return torch.from_numpy(blocks).to(device), torch.from_numpy(ref).to(device)


def activations(m, k, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(device=device, dtype=dtype)


def assert_matmul(y, x, w, bias=None):
    """y vs x @ w^T (+ bias) in float64, with the bound of x's dtype (module docstring)."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (bias.double() if bias is not None else 0)
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    if x.dtype == torch.float32:
        bound = 1e-5 * ref.abs().max()
        assert err.max() <= bound, f"max error {err.max():.3g} > {bound:.3g}"
    else:
        u = UNIT[x.dtype]
        bound = u * (xd.abs() @ wd.abs().T + ref.abs()) * 1.01 + 1e-6 * ref.abs().max()
        worst = (err / bound).max()
        assert worst <= 1, f"error {worst:.3g} x the bf16/fp16 rounding bound"


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_bit_equal(fmt, device):
    blocks, ref = tensors(fmt, device)
    assert torch.equal(tq.dequantize(blocks, fmt), ref)
    assert_bf16(tq.dequantize(blocks, fmt, torch.bfloat16), ref)


def assert_bf16(out, ref):
    if BF16_TRUNCATES:
        assert ((out.float() - ref).abs() <= ref.abs() * 2.0**-7).all()
    else:
        assert torch.equal(out, ref.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["gemv", "tiled", "dequant"])
@pytest.mark.parametrize("m", [1, 3, 16, 37])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul(fmt, m, path, dtype, device):
    blocks, w = tensors(fmt, device)
    x = activations(m, K, dtype, device)
    assert_matmul(tq.quant_matmul(x, blocks, fmt, path=path), x, w)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_prompts_dequantize_once_in_chunks(fmt, dtype, device, monkeypatch):
    """From DEQUANT_MIN_M tokens quant_matmul decodes W into x's dtype and multiplies with torch,
    DEQUANT_CHUNK_BYTES of rows at a time: here 16 rows, so 4 chunks of N = 64 (and the bias's
    matching slices); the same bound as the kernels."""
    blocks, w = tensors(fmt, device)
    m = tq.DEQUANT_MIN_M
    x = activations(m, K, dtype, device)
    bias = torch.randn(N).to(device=device, dtype=dtype)
    chunks = []
    rows = tq._rows
    monkeypatch.setattr(tq, "_rows", lambda ids, b, *a: chunks.append(b.shape[0]) or rows(ids, b, *a))
    monkeypatch.setattr(tq, "DEQUANT_CHUNK_BYTES", 16 * K * x.element_size())
    assert_matmul(tq.quant_matmul(x, blocks, fmt, bias), x, w, bias)
    assert chunks == [16] * 4
    monkeypatch.undo()
    chunks.clear()
    monkeypatch.setattr(tq, "_rows", lambda ids, b, *a: chunks.append(b.shape[0]) or rows(ids, b, *a))
    assert_matmul(tq.quant_matmul(x[: m - 1], blocks, fmt), x[: m - 1], w)  # fewer tokens: the tiled kernel
    assert chunks == []


def test_the_memory_plan_counts_the_dequant_paths_chunk():
    from tandem.placement import memory

    assert (memory.DEQUANT_MIN_TOKENS, memory.DEQUANT_CHUNK_BYTES) == (tq.DEQUANT_MIN_M, tq.DEQUANT_CHUNK_BYTES)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("m", [1, 5])
def test_split_k_and_bias(fmt, m, device):
    """Split K (partial sums added by the last split to arrive) on the GEMV (m=1) and tensor-core (m=5) variants."""
    blocks, w = tensors(fmt, device)
    x = activations(m, K, torch.float32, device)
    bias = torch.randn(N).to(device)
    assert_matmul(tq.quant_matmul(x, blocks, fmt, bias, path="gemv", split_k=2), x, w, bias)
    assert_matmul(tq.quant_matmul(x, blocks, fmt, path="gemv", split_k=2), x, w)
    assert_matmul(tq.quant_matmul(x, blocks, fmt, bias.bfloat16(), path="tiled"), x, w, bias.bfloat16())


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0"])
@pytest.mark.parametrize("m", [1, 3])
def test_split_k_adds_each_split_once_in_order(fmt, m, device):
    """K = 3 splits of 256 weights: the result is, bit for bit, the three splits' own products
    (each a call on its slice of K) added in split order, then the bias; twice (the second call
    finds the arrival counters reset), and the counters end at 0."""
    from tandem.ops.triton import arrive

    k = 768
    blocks, _ = tensors(fmt, device, k=k, seed=3)
    x = activations(m, k, torch.float32, device)
    bias = torch.randn(N).to(device)
    step_bytes = tq.row_bytes(fmt, 256)
    parts = [tq.quant_matmul(x[:, 256 * s : 256 * (s + 1)].contiguous(), blocks[:, step_bytes * s : step_bytes * (s + 1)]
                             .contiguous(), fmt, path="gemv", split_k=1) for s in range(3)]
    want = (torch.zeros_like(parts[0]) + parts[0] + parts[1] + parts[2]) + bias
    for _ in range(2):
        assert torch.equal(tq.quant_matmul(x, blocks, fmt, bias, path="gemv", split_k=3), want)
    assert not arrive._BUFFERS["quant_matmul", -1 if device == "cpu" else torch.device(device).index or 0].any()


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K", "Q5_0"])
def test_odd_rows_and_strided_operands(fmt, device):
    """N = 97 and 48 (partial row tiles); x rows and blocks rows with gaps between them."""
    big, w_big = tensors(fmt, device, n=194, k=256, seed=2)
    blocks, w = big[::2], w_big[::2]  # [97, row_bytes], row stride twice the row
    wide = activations(3, 512, torch.float32, device)
    x = wide[:, :256]  # row stride 512
    for path in ("gemv", "tiled"):
        assert_matmul(tq.quant_matmul(x, blocks, fmt, path=path), x, w)
        assert_matmul(tq.quant_matmul(x[:1], blocks[:48], fmt, path=path), x[:1], w[:48])


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q5_0"])
def test_k_not_a_multiple_of_the_step(fmt, device):
    """K = 352: 11 blocks of 32, so the last 256-weight step is partly past the row's end."""
    blocks, w = tensors(fmt, device, n=40, k=352, seed=3)
    assert torch.equal(tq.dequantize(blocks, fmt), w)
    for m, path in ((1, "gemv"), (4, "gemv"), (20, "tiled")):
        x = activations(m, 352, torch.float32, device)
        assert_matmul(tq.quant_matmul(x, blocks, fmt, path=path), x, w)


def test_fp16_activations(device):
    blocks, w = tensors("Q4_K", device)
    for m in (1, 4, 20):
        x = activations(m, K, torch.float16, device)
        assert_matmul(tq.quant_matmul(x, blocks, "q4_k"), x, w)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K", "Q8_0"])
def test_embedding(fmt, device):
    blocks, w = tensors(fmt, device)
    for ids_dtype in (torch.int64, torch.int32):
        ids = torch.tensor([5, 0, N - 1, 5, 13], dtype=ids_dtype, device=device)
        assert torch.equal(tq.embedding(ids, blocks, fmt, torch.float32), w[ids.long()])
    ids = torch.tensor([N - 1, 2], device=device)
    assert_bf16(tq.embedding(ids, blocks, fmt, torch.bfloat16), w[ids])
    assert tq.embedding(ids[:0], blocks, fmt, torch.float32).shape == (0, K)


def test_embedding_rejects_ids_outside_the_table_on_cpu():
    if DEVICES != ["cpu"]:
        pytest.skip("CUDA gives zero rows instead (no host sync)")
    blocks, _ = tensors("Q8_0", "cpu")
    with pytest.raises(TandemError, match="outside the embedding table"):
        tq.embedding(torch.tensor([0, N]), blocks, "Q8_0", torch.float32)


def test_clear_errors(device):
    blocks, _ = tensors("Q4_K", device)
    x = activations(2, K, torch.float32, device)
    with pytest.raises(TandemError, match=r"uint8 \[N, 288\]"):
        tq.quant_matmul(x, blocks[:, :-1], "Q4_K")  # one byte short per row
    with pytest.raises(TandemError, match=r"uint8 \[N, 288\]"):
        tq.quant_matmul(x, blocks.float(), "Q4_K")
    with pytest.raises(TandemError, match=r"Q6_K .* uint8 \[N, 420\]"):
        tq.quant_matmul(x, blocks, "Q6_K")  # the wrong format for these bytes
    with pytest.raises(TandemError, match="multiple of 256"):
        tq.quant_matmul(x[:, :100], blocks, "Q4_K")
    with pytest.raises(TandemError, match="block formats"):
        tq.quant_matmul(x, blocks, "F16")
    with pytest.raises(TandemError, match=r"x \[M, K\]"):
        tq.quant_matmul(x[None], blocks, "Q4_K")
    with pytest.raises(TandemError, match="bias"):
        tq.quant_matmul(x, blocks, "Q4_K", torch.zeros(N + 1, device=device))
    with pytest.raises(TandemError, match="'dequant'"):
        tq.quant_matmul(x, blocks, "Q4_K", path="cublas")
    with pytest.raises(TandemError, match="multiple of 144"):
        tq.dequantize(blocks[:, :100], "Q4_K")
    with pytest.raises(TandemError, match="ids"):
        tq.embedding(torch.zeros(2, 2, dtype=torch.long, device=device), blocks, "Q4_K", torch.float32)


def test_quant_linear(device):
    blocks, w = tensors("Q4_K", device)
    bias = torch.randn(N).to(device)
    layer = QuantLinear.from_blocks(blocks, "q4_k", bias)
    assert (layer.in_features, layer.out_features, layer.weight_format) == (K, N, "Q4_K")
    assert not hasattr(layer, "weight") and "blocks" not in layer.state_dict()
    assert layer.nbytes == blocks.numel() + 4 * N
    x = activations(6, K, torch.float32, device).view(2, 3, K)
    y = layer(x)
    assert y.shape == (2, 3, N)
    assert_matmul(y.view(6, N), x.view(6, K), w, bias)

    empty = QuantLinear(K, N, "Q6_K", device=device)
    assert empty.blocks.shape == (N, K // 256 * 210) and empty.blocks.dtype == torch.uint8
    assert empty.to(torch.bfloat16).blocks.dtype == torch.uint8  # casts leave the blocks alone
    with pytest.raises(TandemError, match="multiple of 256"):
        QuantLinear(100, N, "Q4_K")


def test_quant_embedding(device):
    blocks, w = tensors("Q6_K", device)
    table = QuantEmbedding.from_blocks(blocks, "Q6_K", dtype=torch.float32)
    assert (table.num_embeddings, table.embedding_dim, table.nbytes) == (N, K, blocks.numel())
    assert not hasattr(table, "weight")
    ids = torch.tensor([[3, 9, 3], [0, N - 1, 7]], device=device)
    assert torch.equal(table(ids), w[ids])
    assert table.to(torch.bfloat16)(ids).dtype == torch.bfloat16  # follows casts like a float weight
    with pytest.raises(TandemError, match="uint8"):
        QuantEmbedding.from_blocks(blocks[:, :-2], "Q6_K")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture():
    """Every path replays from a CUDA graph (no host syncs), after one warm-up call compiled it."""
    blocks, w = tensors("Q4_K", "cuda")
    xs = {m: activations(m, K, torch.bfloat16, "cuda") for m in (1, 4, 40)}
    calls = {m: (lambda x=x: tq.quant_matmul(x, blocks, "Q4_K", split_k=2 if x.shape[0] < 16 else None)) for m, x in xs.items()}
    ids = torch.tensor([1, 2, 3], device="cuda")
    calls["embedding"] = lambda: tq.embedding(ids, blocks, "Q4_K", torch.bfloat16)
    for call in calls.values():
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = {name: call() for name, call in calls.items()}
    graph.replay()
    torch.cuda.synchronize()
    for m, x in xs.items():
        assert_matmul(outs[m], x, w)
    assert torch.equal(outs["embedding"], w[ids].bfloat16())
