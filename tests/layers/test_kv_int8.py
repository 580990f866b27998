"""The int8 MLA cache (--kv-cache int8): rows of int8 codes with an fp32 scale per 64 latent values
and one for the rope key (ops.reference.mla_int8_layout), written by the reference and by the fused
cache-write kernel, read by the decode kernel and the torch paths, through whole tiny models.

The kernels run in Triton's interpreter here (tests/conftest.py); the GPU-marked test compiles them,
and one test compiles them for sm_90 without a GPU to check their PTX's accesses to the cache rows.
Bounds: a code is within half a scale step of its value (1/254 of its group's largest); logits of
a model on the int8 cache against the same model on an fp32 cache: median row 1e-2, and greedy tokens
agree wherever the fp32 run's margin exceeds 10x that (the margin rule).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from tandem.errors import TandemError
from tandem.layers import norm
from tandem.ops import reference as ref
from tandem.ops.triton import attention as attn
from tandem.ops.triton import fused
from tandem.runtime.llm import LLM
from tandem.testing.tiny import write_tiny
from tests.conftest import margin_steps, rel_err
from tests.runtime.test_attention_kernels_path import run_steps

INTERPRETED = isinstance(attn._split_kernel, InterpretedFunction)
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled for CUDA in this process")


def test_layout_and_round_trip():
    assert ref.mla_int8_layout(512, 64) == (8, 576, 612)  # DeepSeek-V2/V3: 612 bytes a row, bf16 takes 1152
    assert ref.mla_int8_layout(19, 6) == (1, 28, 36)  # padded to 4 bytes before the scales
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(50, 130, generator=g) * torch.linspace(0.01, 5, 130)  # three groups, uneven sizes
    k_pe = torch.randn(50, 10, generator=g) * 40
    latent[3] = 0.0  # a zero group keeps scale 1 and codes 0
    rows = ref.mla_int8_rows(latent, k_pe)
    assert rows.dtype == torch.uint8 and rows.shape == (50, ref.mla_int8_layout(130, 10)[2])
    back = ref.mla_int8_values(rows, 130, 10)
    for got, want in ((back[:, :130], latent), (back[:, 130:], k_pe)):
        groups = want.split(64, dim=1) if want is latent else (want,)
        for i, part in enumerate(groups):
            cols = slice(64 * i, 64 * i + part.shape[1]) if want is latent else slice(None)
            step = part.abs().amax(dim=1, keepdim=True) / 127
            assert ((got[:, cols] - part).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all()
    assert (back[3, :130] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("c, dr, dtype", [(32, 8, torch.float32), (19, 6, torch.float32), (512, 64, torch.bfloat16)])
def test_fused_write_matches_the_reference_rows(c, dr, dtype):
    g = torch.Generator().manual_seed(1)
    kv = (torch.randn(5, c + dr, generator=g) * 3).to(dtype)
    weight = (torch.rand(c, generator=g) + 0.5).to(dtype)
    cos, sin = torch.randn(5, dr // 2, generator=g).to(dtype), torch.randn(5, dr // 2, generator=g).to(dtype)
    cache = torch.zeros(20, ref.mla_int8_layout(c, dr)[2], dtype=torch.uint8)
    slots = torch.tensor([3, 7, -1, 0, 12])
    fused.mla_cache_write(kv, weight, 1e-6, cos, sin, cache, slots, c, True)
    want = ref.mla_int8_rows(ref.rms_norm(kv[:, :c], weight, 1e-6), ref.apply_rope(kv[:, c:], cos, sin, True))
    got = cache[slots[slots >= 0]]
    want = want[slots >= 0]
    # The kernel's fp32 norm may differ from torch's in the last bit: a code may then move by one.
    codes = lambda rows: rows[:, : c + dr].view(torch.int8).int()  # noqa: E731
    assert (codes(got) - codes(want)).abs().max() <= 1
    assert rel_err(ref.mla_int8_values(got, c, dr), ref.mla_int8_values(want, c, dr)) <= 1e-2
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (cache[untouched] == 0).all()  # the padding token (-1) wrote nothing


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel_reads_int8_rows(splits):
    # fp32 queries: the kernel's dequantized tiles are the reference's values exactly.
    c, dr, nh, bs = 19, 6, 3, 8
    g = torch.Generator().manual_seed(2)
    values = torch.randn(12 * bs, c + dr, generator=g)
    cache = ref.mla_int8_rows(values[:, :c], values[:, c:])
    tables = torch.tensor([[3, 7, 1, 0, 0], [2, 5, 9, 11, 4]], dtype=torch.int32)
    q_lat, q_pe = torch.randn(2, nh, c, generator=g), torch.randn(2, nh, dr, generator=g)
    seq, pos = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([4, 36])
    config = attn.DecodeConfig(block_h=16, block_n=16, min_chunk=16)
    got = attn.mla_decode(q_lat, q_pe, cache, tables, seq, pos, bs, 0.3, splits, config=config)
    want = attn.mla_decode(q_lat, q_pe, ref.mla_int8_values(cache, c, dr), tables, seq, pos, bs, 0.3, splits,
                           config=config)
    assert torch.equal(got, want)


def _two(tmp_path, variant: str, **kw):
    path = write_tiny(tmp_path, variant, seed=3)
    common = dict(dtype="float32", progress=False, max_context=256, max_batch=1, experts="torch", **kw)
    return LLM(path, **common), LLM(path, kv_cache="int8", **common)


@pytest.mark.parametrize("variant", ["deepseek_v3", "deepseek_v2_lite"])
def test_int8_cache_follows_the_float_cache(tmp_path, variant):
    plain, int8 = _two(tmp_path, variant)
    assert int8.engine.cache.kv[0].dtype == torch.uint8
    c, dr = int8.model.layers[0].attn.cfg.kv_lora_rank, int8.model.layers[0].attn.cfg.qk_rope_head_dim
    assert int8.plan.kv.bytes == int8.plan.kv.tokens * len(int8.model.layers) * ref.mla_int8_layout(c, dr)[2]
    _check_follows(plain, int8)


def _prompts_and_steps(vocab: int):
    """Three prompts, then a decode step and a step of 3 / 1 / 4 new tokens (run_steps' input)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 37, 12)]
    steps = [[torch.randint(0, vocab, (n,), generator=g).tolist() for n in shape] for shape in ([1, 1, 1], [3, 1, 4])]
    return prompts, steps


def _check_follows(plain: LLM, int8: LLM) -> None:
    """200 teacher-forced tokens scored on both caches."""
    tokens = torch.randint(0, plain.tokenizer.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    want, got = plain.engine.score(tokens), int8.engine.score(tokens)
    # A few rows jump where a routing choice tips (top-k of near-equal scores): the median row counts.
    rows = (got - want).abs().amax(dim=-1) / want.abs().amax(dim=-1)
    assert rows.median() <= 1e-2
    checked, bad = margin_steps(got, want, 1e-2)
    assert checked >= 16 and not bad, (checked, bad)


@needs_interpreter
def test_kernel_paths_on_the_int8_cache(tmp_path, monkeypatch):
    # The fused cache write and the decode kernel (interpreted) against the torch paths, both on int8 rows.
    _, int8 = _two(tmp_path, "deepseek_v3")
    prompts, steps = _prompts_and_steps(int8.model.embed.num_embeddings)
    want = run_steps(int8.model, "cpu", False, prompts, steps, dtype=torch.uint8)
    monkeypatch.setattr(norm, "FUSED_ON_CPU", True)
    got = run_steps(int8.model, "cpu", True, prompts, steps, dtype=torch.uint8)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4  # measured 4.4e-7: the same codes, other summation orders


def test_int8_cache_is_for_mla_models(tmp_path):
    with pytest.raises(TandemError, match="int8 KV cache is implemented for MLA models"):
        LLM(write_tiny(tmp_path, "qwen3_moe", seed=3), dtype="float32", progress=False, kv_cache="int8")
    with pytest.raises(TandemError, match="--kv-cache must be auto or int8"):
        LLM(write_tiny(tmp_path / "b", "deepseek_v3", seed=3), dtype="float32", progress=False, kv_cache="fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU and compiled kernels")
def test_int8_cache_on_gpu(tmp_path):
    plain, int8 = _two(tmp_path, "deepseek_v3", device="cuda", cuda_graph=False)
    _check_follows(plain, int8)  # prefill: the torch paths on the GPU
    # Decode steps: the compiled fused write and decode kernel against the torch paths, on int8 rows.
    prompts, steps = _prompts_and_steps(int8.model.embed.num_embeddings)
    want = run_steps(int8.model, "cuda", False, prompts, steps, dtype=torch.uint8)
    got = run_steps(int8.model, "cuda", True, prompts, steps, dtype=torch.uint8)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU and compiled kernels")
@pytest.mark.parametrize("splits", [1, 32])
def test_kernels_on_612_byte_rows_on_gpu(splits):
    # DeepSeek-V2/V3's rows (c 512, dr 64): 612 bytes, so rows at slots that are not multiples of 4
    # start only 4-byte aligned (the tiny models' rows of 48 bytes are all 16-byte aligned). 70 keys
    # cover every slot residue; 32 splits as in a CUDA graph at 8K context.
    c, dr, nh, bs, n = 512, 64, 16, 16, 70
    g = torch.Generator().manual_seed(4)
    kv = (torch.randn(n, c + dr, generator=g) * 3).to(torch.bfloat16).cuda()
    weight = (torch.rand(c, generator=g) + 0.5).to(torch.bfloat16).cuda()
    cos, sin = (torch.randn(n, dr // 2, generator=g).to(torch.bfloat16).cuda() for _ in range(2))
    table = torch.randperm(12, generator=g)[: -(-n // bs)].to(torch.int32)
    slots = (table.long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs).cuda()
    cache = torch.zeros(12 * bs, ref.mla_int8_layout(c, dr)[2], dtype=torch.uint8, device="cuda")
    fused.mla_cache_write(kv, weight, 1e-6, cos, sin, cache, slots, c, True)
    want_rows = ref.mla_int8_rows(ref.rms_norm(kv[:, :c], weight, 1e-6), ref.apply_rope(kv[:, c:], cos, sin, True))
    assert rel_err(ref.mla_int8_values(cache[slots], c, dr), ref.mla_int8_values(want_rows, c, dr)) <= 1e-2
    q_lat, q_pe = torch.randn(1, nh, c, generator=g).cuda(), torch.randn(1, nh, dr, generator=g).cuda()
    tables, pos = table[None].cuda(), torch.tensor([n - 1]).cuda()
    seq = torch.zeros(1, dtype=torch.int32, device="cuda")
    config = attn.default_config(c, int8=True)
    got = attn.mla_decode(q_lat, q_pe, cache, tables, seq, pos, bs, 0.1, splits, config=config)
    want = attn.mla_decode(q_lat, q_pe, ref.mla_int8_values(cache, c, dr), tables, seq, pos, bs, 0.1, splits,
                           config=config)
    torch.cuda.synchronize()
    assert rel_err(got, want) <= 1e-5


# ---------------------------------------------------------------- compiled memory accesses (no GPU)
# A V2/V3 int8 row is 612 bytes: rows start only 4-byte aligned. A compiled kernel must never move
# more than 4 bytes at once through a cache pointer. Triton without triton-lang/triton#9297 took the
# decode kernel's rows as 16-byte aligned and loaded codes 16 bytes at a time (misaligned address on
# an H200 once decode read rows at slots that are not multiples of 4). The kernels are compiled for
# sm_90 here as Triton's launcher would specialize them for the bench's shapes, and the PTX's global
# accesses whose address derives from the cache pointer are checked.

_WIDE = re.compile(r"\.v[248]\.|\.b64|\.b128|\.[usf]64")


def _specialize(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, index of each kept parameter) as Triton's launcher specializes
    these arguments: a pointer 16-byte aligned and an int divisible by 16 get tt.divisibility 16,
    an int equal to 1 becomes a constant."""
    names = fn.arg_names
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
              torch.int32: "i32", torch.int64: "i64"}
    sig, const, attrs, ptx_param = {}, {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        aligned = False
        if fn.params[i].is_constexpr:
            sig[name], const[name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            sig[name], aligned = "*" + dtypes[v.dtype], v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name], aligned = ("i32" if -(2**31) <= v < 2**31 else "i64"), v % 16 == 0
        else:
            sig[name] = "fp32"
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
        ptx_param[name] = len(ptx_param)
    return sig, const, attrs, ptx_param


def _derived_accesses(ptx: str, kernel: str, param: int) -> list[str]:
    """Global loads / stores / async copies of `ptx` whose address derives from `kernel`'s pointer
    parameter number `param` (registers computed from it, to a fixed point through loops)."""
    lines = [line.split("//")[0].strip() for line in ptx.splitlines()]
    reg = re.compile(r"%[a-z]+\d+")
    tainted = {m.group(1) for line in lines
               if (m := re.match(rf"ld\.param\.\w+\s+(%\w+),\s*\[{kernel}_param_{param}\]", line))}
    changed = True
    while changed:
        changed = False
        for line in lines:
            body = re.sub(r"^@!?%p\d+\s+", "", line)
            if not body or body[0] in ".{}$" or re.match(r"(ld|st|cp\.async|bra|ret)\b", body):
                continue
            regs = reg.findall(body)
            if len(regs) >= 2 and regs[0] not in tainted and any(r in tainted for r in regs[1:]):
                tainted.add(regs[0])
                changed = True
    found = []
    for line in lines:
        body = re.sub(r"^@!?%p\d+\s+", "", line)
        op = re.match(r"((?:ld|st)\.global[\w.]*|cp\.async[\w.]*)\s", body)
        addrs = re.findall(r"\[\s*(%\w+)", body)
        if op and op.group(1).startswith("cp.async"):
            addrs = addrs[1:]  # [shared destination], [global source]
        if op and addrs and addrs[0] in tainted:
            size = re.search(r"\],\s*(0x[0-9a-f]+|\d+)", body) if op.group(1).startswith("cp.async") else None
            found.append(op.group(1) + (f" {int(size.group(1), 0)}B" if size else ""))
    return found


def _compiled_accesses() -> dict:
    """{kernel: {argument: [access shapes]}} of the int8 cache write and decode kernels compiled for
    sm_90 at DeepSeek-V2-Lite's shapes (c 512, dr 64, 16 heads, blocks of 16, bf16, 32 splits as
    in a CUDA graph). Runs without TRITON_INTERPRET (see the test)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    c, dr, nh, bs = 512, 64, 16, 16
    calls = {}

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.setdefault(self.fn.__name__, (self.fn, args, kwargs))

    attn._split_kernel, attn._reduce_kernel = Recorder(attn._split_kernel), Recorder(attn._reduce_kernel)
    fused._mla_cache_write_kernel = Recorder(fused._mla_cache_write_kernel)
    fused._check_device = lambda *tensors: None  # CPU tensors stand in for the GPU's
    cache = torch.zeros(64 * bs, ref.mla_int8_layout(c, dr)[2], dtype=torch.uint8)
    kv, w = torch.zeros(1, c + dr, dtype=torch.bfloat16), torch.ones(c, dtype=torch.bfloat16)
    cos = sin = torch.zeros(1, dr // 2, dtype=torch.bfloat16)
    fused.mla_cache_write(kv, w, 1e-6, cos, sin, cache, torch.tensor([5]), c, True)
    q_lat = torch.zeros(nh, 1, c, dtype=torch.bfloat16).transpose(0, 1)
    q_pe = torch.zeros(1, nh, dr, dtype=torch.bfloat16)
    tables, seq, pos = torch.zeros(1, 512, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.tensor([64])
    attn.mla_decode(q_lat, q_pe, cache, tables, seq, pos, bs, 0.1, 32)
    out = {}
    watched = {"_split_kernel": ("cache_ptr", "q_ptr"), "_mla_cache_write_kernel": ("cache_ptr", "kv_ptr")}
    for name, watch in watched.items():
        fn, args, kwargs = calls[name]
        sig, const, attrs, ptx_param = _specialize(fn, args, kwargs)
        options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=options)
        out[name] = {arg: _derived_accesses(k.asm["ptx"], name, ptx_param[arg]) for arg in watch}
    return out


@pytest.mark.slow
def test_compiled_kernels_move_int8_rows_in_words_at_most():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's CUDA backend is not installed")
    # A fresh process: the kernels here may be interpreted; TRITON_INTERPRET=0 keeps conftest from
    # choosing the interpreter there.
    code = ("import json, sys; sys.path.insert(0, '.'); from tests.layers.test_kv_int8 import _compiled_accesses;"
            "print('ACCESSES', json.dumps(_compiled_accesses()))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("ACCESSES", 1)[1])
    for kernel, args in found.items():
        cache = args["cache_ptr"]
        assert cache, f"{kernel}: no access through the cache pointer found in the PTX"
        wide = [a for a in cache if _WIDE.search(a) or re.search(r"\b(8|16)B$", a)]
        assert not wide, f"{kernel}: accesses wider than 4 bytes on 4-aligned int8 rows: {sorted(set(wide))}"
        # The scan sees vector accesses where they are legal (16-aligned bf16 rows of q / kv).
        other = [a for name, acc in args.items() if name != "cache_ptr" for a in acc]
        assert any(_WIDE.search(a) or re.search(r"\b(8|16)B$", a) for a in other), (kernel, other)
