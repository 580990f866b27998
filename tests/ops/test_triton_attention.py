"""Triton paged decode attention (ops/triton/attention.py) against the reference ops, token by token
on gathered cache rows.

Every scenario has sequences of 1, 5, 37 and 100 tokens in shuffled, non-contiguous blocks with
padded block tables, one sequence with three consecutive queries in the step (causal masking
between them), a padding token (position -1, output zeros) and tokens in shuffled order. Cache rows
that no query may read (spare blocks, the tail of each last block, the padding entries of the block
tables) hold NaN, so a kernel that reads past a context or through a padding entry fails.

CPU runs the kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a
GPU); CUDA compiles them. On a GPU machine run twice: plain for CUDA, TRITON_INTERPRET=1 for CPU.
"""

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from tandem.ops import reference
from tandem.ops.triton import attention as attn
from tests.conftest import triton_device

INTERPRETED = isinstance(attn._split_kernel, InterpretedFunction)
LENGTHS = (1, 5, 37, 100)
# (sequence, position) of each query: three consecutive queries of the 37-token sequence.
QUERIES = [(0, 0), (1, 4), (2, 34), (2, 35), (2, 36), (3, 99), (0, -1)]
# Small tiles so 100 keys span several tiles and splits; min_chunk = one tile lets short contexts split too.
SMALL = attn.DecodeConfig(block_h=16, block_n=16, min_chunk=16, num_warps=4, num_stages=2)
FP32_BOUND = 1e-5
# bf16: q and cache are bf16 (the reference reads the same values in fp32); the kernel rounds the
# probabilities to bf16 for p @ V and the output to bf16, ~2 x 2^-9 relative (measured 3-4e-3).
BF16_BOUND = 1e-2


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return triton_device(request, INTERPRETED)


class Paged:
    """A paged cache holding LENGTHS, NaN everywhere no query may look, and the step's query tensors."""

    def __init__(self, width: int, block_size: int, dtype: torch.dtype, device: str, seed: int, pos_dtype=torch.int64):
        g = torch.Generator().manual_seed(seed)
        bs = block_size
        need = [-(-n // bs) for n in LENGTHS]
        num_blocks = sum(need) + 3  # + spare blocks nobody owns
        ids = torch.randperm(num_blocks, generator=g)
        poison = int(ids[-1])  # a spare block: the padding entries of the block tables point here
        tables = torch.full((len(LENGTHS), max(need) + 2), poison, dtype=torch.int32)
        start = 0
        for s, n in enumerate(need):
            tables[s, :n] = ids[start : start + n]
            start += n
        cache = torch.full((num_blocks * bs, width), float("nan"))
        for s, n in enumerate(LENGTHS):
            rows = self._rows(tables[s], bs, n)
            cache[rows] = torch.randn(n, width, generator=g)
        order = torch.randperm(len(QUERIES), generator=g)
        self.queries = [QUERIES[i] for i in order]
        self.block_size, self.tables_cpu = bs, tables
        self.cache_cpu = cache.to(dtype)
        self.cache = self.cache_cpu.to(device)
        self.block_tables = tables.to(device)
        self.seq_of_token = torch.tensor([s for s, _ in self.queries], dtype=torch.int32, device=device)
        self.positions = torch.tensor([p for _, p in self.queries], dtype=pos_dtype, device=device)

    @staticmethod
    def _rows(table: torch.Tensor, bs: int, n: int) -> torch.Tensor:
        return (table.long()[:, None] * bs + torch.arange(bs)).reshape(-1)[:n]

    def context(self, t: int) -> torch.Tensor:
        """fp32 cache rows of positions 0..p of token t's sequence, in order. [p + 1, width]"""
        s, p = self.queries[t]
        return self.cache_cpu[self._rows(self.tables_cpu[s], self.block_size, p + 1)].float()


def check(out: torch.Tensor, ref: torch.Tensor, paged: Paged, bound: float):
    out = out.cpu().float()
    for t, (_, p) in enumerate(paged.queries):
        if p < 0:
            assert torch.equal(out[t], torch.zeros_like(out[t])), "a padding token's output must be zeros"
    assert not out.isnan().any(), "NaN in the output: the kernel read a row outside a context"
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= bound, f"relative error {err:.2e} > {bound:.0e}"


def mla_reference(q_lat, q_pe, paged: Paged, c: int, scale: float) -> torch.Tensor:
    """reference.mla_attention_absorbed per token with W_UK = W_UV = I, i.e. in latent space."""
    t_, nh = q_lat.shape[:2]
    eye = torch.eye(c).expand(nh, c, c)
    out = torch.zeros(t_, nh, c)
    for t, (_, p) in enumerate(paged.queries):
        if p >= 0:
            kv = paged.context(t)
            q1, q2 = q_lat[t : t + 1].cpu().float(), q_pe[t : t + 1].cpu().float()
            out[t] = reference.mla_attention_absorbed(q1, q2, kv[:, :c], kv[:, c:], eye, eye, scale, p)[0]
    return out


def gqa_reference(q, paged: Paged, nkv: int, scale: float, window) -> torch.Tensor:
    t_, nh, d = q.shape
    out = torch.zeros(t_, nh, d)
    for t, (_, p) in enumerate(paged.queries):
        if p >= 0:
            k, v = paged.context(t).view(-1, 2, nkv, d).unbind(1)
            out[t] = reference.attention(q[t : t + 1].cpu().float(), k, v, scale, p, window)[0]
    return out


def mla_inputs(nh, c, dr, dtype, device, seed):
    # q_lat and q_pe as strided views of one tensor, as the layer produces them.
    q = torch.randn(len(QUERIES), nh, c + dr, generator=torch.Generator().manual_seed(seed))
    q = q.to(dtype).to(device)
    return q[..., :c], q[..., c:]


@pytest.mark.parametrize(
    "dtype, block_size, num_splits",
    [
        (torch.float32, 8, 1),  # one program per token and head block writes the output itself
        (torch.float32, 16, 8),  # more splits than the 100-token context's 7 chunks: empty splits
        (torch.bfloat16, 16, 3),
    ],
)
def test_mla_decode(device, dtype, block_size, num_splits):
    nh, c, dr, scale = 5, 40, 24, 0.15  # odd heads, dims that are not powers of two
    paged = Paged(c + dr, block_size, dtype, device, seed=block_size + num_splits)
    q_lat, q_pe = mla_inputs(nh, c, dr, dtype, device, seed=1)
    out = attn.mla_decode(
        q_lat, q_pe, paged.cache, paged.block_tables, paged.seq_of_token, paged.positions, block_size, scale,
        num_splits, config=SMALL,
    )
    assert out.shape == (len(QUERIES), nh, c) and out.dtype == dtype
    bound = FP32_BOUND if dtype == torch.float32 else BF16_BOUND
    check(out, mla_reference(q_lat, q_pe, paged, c, scale), paged, bound)


def test_mla_decode_default_config_two_head_blocks(device):
    # 17 heads: a second head block with one real head; default tiles; int32 positions.
    nh, c, dr, scale = 17, 32, 16, 0.2
    paged = Paged(c + dr, 8, torch.float32, device, seed=3, pos_dtype=torch.int32)
    q_lat, q_pe = mla_inputs(nh, c, dr, torch.float32, device, seed=2)
    out = attn.mla_decode(q_lat, q_pe, paged.cache, paged.block_tables, paged.seq_of_token, paged.positions, 8, scale, 1)
    check(out, mla_reference(q_lat, q_pe, paged, c, scale), paged, FP32_BOUND)


@pytest.mark.parametrize(
    "dtype, block_size, num_splits, window",
    [
        (torch.float32, 8, 1, None),
        (torch.float32, 16, 4, 30),  # a window shorter than the context, split across programs
        (torch.bfloat16, 8, 3, 50),
    ],
)
def test_gqa_decode(device, dtype, block_size, num_splits, window):
    nh, nkv, d, scale = 6, 2, 24, 0.2  # 3 query heads per kv head
    paged = Paged(2 * nkv * d, block_size, dtype, device, seed=block_size + num_splits, pos_dtype=torch.int32)
    q = torch.randn(len(QUERIES), nh, d, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    out = attn.gqa_decode(
        q, paged.cache, paged.block_tables, paged.seq_of_token, paged.positions, block_size, scale, nkv, num_splits,
        window, config=SMALL,
    )
    assert out.shape == (len(QUERIES), nh, d) and out.dtype == dtype
    bound = FP32_BOUND if dtype == torch.float32 else BF16_BOUND
    check(out, gqa_reference(q, paged, nkv, scale, window), paged, bound)


@pytest.mark.parametrize(
    "nh, nkv, num_splits",
    [
        (18, 1, 1),  # multi-query: 18 heads of one kv head span two head blocks
        (3, 3, 2),  # one query head per kv head
    ],
)
def test_gqa_decode_head_layouts(device, nh, nkv, num_splits):
    d, scale = 16, 0.25
    paged = Paged(2 * nkv * d, 8, torch.float32, device, seed=nh)
    q = torch.randn(len(QUERIES), nh, d, generator=torch.Generator().manual_seed(5)).to(device)
    out = attn.gqa_decode(q, paged.cache, paged.block_tables, paged.seq_of_token, paged.positions, 8, scale, nkv, num_splits)
    check(out, gqa_reference(q, paged, nkv, scale, None), paged, FP32_BOUND)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU and compiled kernels")
def test_cuda_graph_replay_follows_new_positions_and_tables():
    """Capture once, then change cache contents, block tables and positions in place: the replay
    must attend the new contexts (nothing about lengths is baked into the graph)."""
    nh, c, dr, scale, bs = 16, 64, 16, 0.1, 16
    first = Paged(c + dr, bs, torch.bfloat16, "cuda", seed=7)
    q_lat, q_pe = mla_inputs(nh, c, dr, torch.bfloat16, "cuda", seed=8)
    nkv, d = 2, 32
    q = torch.randn(len(QUERIES), 8, d, device="cuda", dtype=torch.bfloat16)
    gqa_cache = Paged(2 * nkv * d, bs, torch.bfloat16, "cuda", seed=9)

    def step():
        o1 = attn.mla_decode(
            q_lat, q_pe, first.cache, first.block_tables, first.seq_of_token, first.positions, bs, scale, 4,
            config=SMALL,
        )
        o2 = attn.gqa_decode(
            q, gqa_cache.cache, gqa_cache.block_tables, gqa_cache.seq_of_token, gqa_cache.positions, bs, scale,
            nkv, 4, 40, config=SMALL,
        )
        return o1, o2

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o1, o2 = step()

    for paged, seed in ((first, 17), (gqa_cache, 19)):
        new = Paged(paged.cache.shape[1], bs, torch.bfloat16, "cuda", seed=seed)
        assert new.cache.shape == paged.cache.shape and new.block_tables.shape == paged.block_tables.shape
        paged.cache.copy_(new.cache)
        paged.block_tables.copy_(new.block_tables)
        paged.seq_of_token.copy_(new.seq_of_token)
        paged.positions.copy_(new.positions)
        paged.cache_cpu, paged.tables_cpu, paged.queries = new.cache_cpu, new.tables_cpu, new.queries
    graph.replay()
    torch.cuda.synchronize()
    check(o1, mla_reference(q_lat, q_pe, first, c, scale), first, BF16_BOUND)
    check(o2, gqa_reference(q, gqa_cache, nkv, scale, 40), gqa_cache, BF16_BOUND)


def test_default_splits():
    # One token of V3 (8 head blocks of 16) at a long context: about two programs per SM.
    assert attn.default_splits(32768, 1, 128, 1, num_sms=132) == 33
    # A short maximum context caps the splits at one per min_chunk keys.
    assert attn.default_splits(1000, 1, 128, 1, num_sms=132) == 4
    # A batch that fills the GPU on its own gets one split.
    assert attn.default_splits(32768, 64, 128, 1, num_sms=132) == 1
    # Qwen3 GQA: 4 kv heads of 8 query heads, one head block each.
    assert attn.default_splits(32768, 1, 32, 4, num_sms=132) == 64
    assert attn.default_splits(0, 1, 4, 1) == 1


def test_rejects_bad_inputs():
    paged = Paged(48, 8, torch.float32, "cpu", seed=0)
    q_lat, q_pe = mla_inputs(4, 32, 16, torch.float32, "cpu", seed=0)
    args = (paged.block_tables, paged.seq_of_token, paged.positions, 8, 0.1, 1)
    with pytest.raises(ValueError, match="c \\+ dr"):
        attn.mla_decode(q_lat, q_pe[..., :8], paged.cache, *args)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        attn.mla_decode(q_lat, q_pe, paged.cache, paged.block_tables.long(), *args[1:])
    with pytest.raises(ValueError, match="num_splits"):
        attn.mla_decode(q_lat, q_pe, paged.cache, *args[:-1], 0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attn.gqa_decode(torch.zeros(len(QUERIES), 5, 12), paged.cache, *args[:-1], 2, 1)
