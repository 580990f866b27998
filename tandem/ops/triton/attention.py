"""Paged-KV decode attention in Triton: MLA (latent space) and GQA, flash-decoding style.

Each query token attends keys 0..positions[t] of its sequence (keys inside the window for sliding
-window GQA), read from the paged cache through its block table: position p lives in row
block_table[p // block_size] * block_size + p % block_size. A negative position marks a padding
token (e.g. a CUDA graph's unused batch slots): it reads nothing and its output is zeros.

Data path: split kernel, grid (head blocks, num_splits, T): each program takes BLOCK_H query heads
that share one KV head (all heads for MLA) and one chunk of the context, loads each cache tile once
for all of them (tl.dot), and writes a partial output + log2-sum-exp -> reduce kernel, grid
(nh, T, width / 64), merges the splits. With num_splits == 1 the split kernel writes the output itself.

CUDA graphs: the grids depend only on shapes and the caller's num_splits; chunk bounds are computed
on the device from positions, so no host sync and no Python-side dependence on context lengths.
A split whose chunk lies past its token's context writes -inf and does no other work.

Compute: dot products run in the cache dtype (bf16/fp16) with fp32 accumulation, or in IEEE fp32
when the query or the cache is fp32; softmax and partial outputs are fp32. Outputs have the query's
dtype.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from tandem.ops.reference import KV_INT8_GROUP, mla_int8_layout

_LOG2E = 1.4426950408889634
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the split kernel; defaults come from `default_config`."""

    block_h: int = 16  # query heads per program (tl.dot needs >= 16 rows; extra rows are masked)
    block_n: int = 32  # keys per cache tile
    min_chunk: int = 256  # a split covers at least this many keys, so short contexts use few splits
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_h", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"DecodeConfig.{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
        if self.min_chunk < 1:
            raise ValueError(f"DecodeConfig.min_chunk must be >= 1, got {self.min_chunk}")


def default_config(head_dim: int, int8: bool = False) -> DecodeConfig:
    """Tile sizes by the width of one key (MLA: kv_lora_rank; GQA: head_dim). Untuned guesses for
    H100/H200; `benchmarks/gpu_attention.py --tune` measures alternatives."""
    if head_dim >= 256 and int8:
        # int8 rows dequantized in registers: 16-key tiles on 8 warps compile without spills for
        # sm_90a (32-key tiles spilled 140 bytes a thread; .dev/compile_check.py).
        return DecodeConfig(block_h=16, block_n=16, num_warps=8, num_stages=2)
    if head_dim >= 256:
        # MLA latent: [16, 512] fp32 accumulator + [32, 512] tiles need 8 warps to stay near 120
        # registers a thread (4 warps: ~210); two stages of tiles are ~56 KB of shared memory.
        return DecodeConfig(block_h=16, block_n=32, num_warps=8, num_stages=2)
    return DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=2)


def default_splits(
    max_context: int,
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int = 1,
    num_sms: int = 132,
    config: DecodeConfig | None = None,
    max_splits: int = 64,
) -> int:
    """num_splits for a launch (or a CUDA graph) serving `num_tokens` queries of contexts up to
    `max_context` keys: enough programs for about two per SM, never more splits than chunks of
    `config.min_chunk` keys in max_context (the rest would always be empty). MLA: num_kv_heads=1.

    Splits beyond what a short context needs cost one -inf store each; each used split costs its
    partial output (nh x width fp32) written and read once, so batches that fill the GPU on their
    own get 1-2 splits. num_sms: torch.cuda.get_device_properties(dev).multi_processor_count;
    config: the one the launches will use (block_h and min_chunk matter), default_config's if None.
    """
    config = config or DecodeConfig()
    group = num_heads // num_kv_heads
    head_blocks = num_kv_heads * math.ceil(group / _block_h(config, group))
    want = math.ceil(2 * num_sms / max(1, num_tokens * head_blocks))
    cap = math.ceil(max(1, max_context) / config.min_chunk)
    return max(1, min(want, cap, max_splits))


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_of_token: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    num_splits: int,
    *,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Multi-head latent attention of decode queries over the paged latent cache.

    q_lat [T, nh, c] (query already through W_UK), q_pe [T, nh, dr], cache [rows, c + dr] rows of
    [latent | rope key], block_tables int32 [B, max_blocks], seq_of_token int32 [T] (row of
    block_tables), positions int32/int64 [T] -> o_lat [T, nh, c] in q_lat's dtype:
    softmax(scale * (q_lat . latent + q_pe . k_pe)) @ latent over keys 0..positions[t].
    """
    c, dr = q_lat.shape[-1], q_pe.shape[-1]
    if q_pe.dim() != 3 or q_pe.shape[:2] != q_lat.shape[:2]:
        raise ValueError(f"q_pe {tuple(q_pe.shape)} must be [T, nh, dr] matching q_lat {tuple(q_lat.shape)}")
    int8 = cache.dtype == torch.uint8  # rows of int8 codes and fp32 scales (reference.mla_int8_layout)
    groups, scale_col, width = mla_int8_layout(c, dr) if int8 else (0, 0, c + dr)
    _check_common(q_lat, cache, block_tables, seq_of_token, positions, block_size, num_splits, width,
                  "int8 row bytes" if int8 else "c + dr")
    if int8 and (cache.stride(0) % 4 or cache.data_ptr() % 4):
        # The kernel reads codes and fp32 scales as 4-byte words (_attend_tile).
        raise ValueError(f"int8 cache rows must start on 4-byte boundaries, got row stride {cache.stride(0)} "
                         f"and data pointer {cache.data_ptr():#x}")
    config = config or default_config(c, int8)
    return _launch(
        q_lat, q_pe, cache, block_tables, seq_of_token, positions, block_size, scale, num_splits, config,
        num_kv_heads=1, d1=c, d2=dr, dv=c, k_col_per_head=0, v_is_k=True, v_col=0, v_col_per_head=0, window=None,
        scale_col=scale_col, groups=groups,
    )


def gqa_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_of_token: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    num_kv_heads: int,
    num_splits: int,
    window: int | None = None,
    *,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Grouped-query attention of decode queries over the paged [K | V] cache.

    q [T, nh, d], cache [rows, 2 * nkv * d] rows of [K of every kv head | V of every kv head];
    query head h reads kv head h // (nh // nkv); with a window, a query at position p sees keys
    max(0, p - window + 1)..p, else 0..p. Other arguments as in `mla_decode`. -> [T, nh, d] in q's dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, nh, d], got {tuple(q.shape)}")
    nh, d = q.shape[1:]
    if num_kv_heads < 1 or nh % num_kv_heads:
        raise ValueError(f"query heads ({nh}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    width = 2 * num_kv_heads * d
    _check_common(q, cache, block_tables, seq_of_token, positions, block_size, num_splits, width, "2 * nkv * d")
    config = config or default_config(d)
    return _launch(
        q, None, cache, block_tables, seq_of_token, positions, block_size, scale, num_splits, config,
        num_kv_heads=num_kv_heads, d1=d, d2=0, dv=d, k_col_per_head=d, v_is_k=False, v_col=num_kv_heads * d,
        v_col_per_head=d, window=window,
    )


def _check_common(q, cache, block_tables, seq_of_token, positions, block_size, num_splits, width, width_name):
    if q.dim() != 3:
        raise ValueError(f"query must be [T, nh, d], got {tuple(q.shape)}")
    n_tok = q.shape[0]
    if cache.dim() != 2 or cache.shape[1] != width:
        raise ValueError(f"cache must be [rows, {width_name} = {width}], got {tuple(cache.shape)}")
    if cache.dtype not in _CACHE_DTYPES + (torch.uint8,) or q.dtype not in _CACHE_DTYPES:
        raise ValueError(f"query dtype must be fp32, bf16 or fp16 and the cache's those or uint8 (int8 MLA rows), "
                         f"got {q.dtype} / {cache.dtype}")
    if cache.stride(1) != 1:
        raise ValueError("cache rows must be contiguous (stride 1 along the width)")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError(
            f"block_tables must be int32 [B, max_blocks] with contiguous rows, got {block_tables.dtype} "
            f"{tuple(block_tables.shape)} strides {block_tables.stride()}"
        )
    if seq_of_token.dtype != torch.int32 or seq_of_token.shape != (n_tok,):
        raise ValueError(f"seq_of_token must be int32 [T={n_tok}], got {seq_of_token.dtype} {tuple(seq_of_token.shape)}")
    if positions.dtype not in (torch.int32, torch.int64) or positions.shape != (n_tok,):
        raise ValueError(f"positions must be int32/int64 [T={n_tok}], got {positions.dtype} {tuple(positions.shape)}")
    if not (seq_of_token.is_contiguous() and positions.is_contiguous()):
        raise ValueError("seq_of_token and positions must be contiguous")
    devices = {t.device for t in (q, cache, block_tables, seq_of_token, positions)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")


def _block_h(config: DecodeConfig, group: int) -> int:
    # No more head rows than the group needs (padded to tl.dot's 16), no fewer than 16.
    return max(16, min(config.block_h, triton.next_power_of_2(group)))


def _launch(
    q, q_pe, cache, block_tables, seq_of_token, positions, block_size, scale, num_splits, config,
    *, num_kv_heads, d1, d2, dv, k_col_per_head, v_is_k, v_col, v_col_per_head, window, scale_col=0, groups=0,
):
    """Keys: columns [kvh * k_col_per_head, +d1) (+ rope columns [d1, d1 + d2) when q_pe is given);
    values: the key columns themselves (v_is_k, MLA) or [v_col + kvh * v_col_per_head, +dv).
    A uint8 cache holds int8 MLA rows: codes in those columns (bytes), fp32 scales from byte
    scale_col (one per INT8_GROUP key columns, then the rope key's)."""
    n_tok, nh = q.shape[:2]
    group = nh // num_kv_heads
    block_h = _block_h(config, group)
    head_blocks = num_kv_heads * triton.cdiv(group, block_h)
    block_n = config.block_n
    min_chunk = triton.cdiv(config.min_chunk, block_n) * block_n  # chunks stay tile-aligned
    direct = num_splits == 1
    out = torch.empty(n_tok, nh, dv, dtype=q.dtype, device=q.device)
    if n_tok == 0:
        return out
    if direct:
        o_part, lse = out.unsqueeze(2), out  # the split kernel writes `out`; lse is never touched
    else:
        o_part = torch.empty(n_tok, nh, num_splits, dv, dtype=torch.float32, device=q.device)
        lse = torch.empty(n_tok, nh, num_splits, dtype=torch.float32, device=q.device)
    has_pe = q_pe is not None
    qpe = q_pe if has_pe else q
    fp32 = q.dtype == torch.float32 or cache.dtype == torch.float32
    int8 = cache.dtype == torch.uint8
    interpreted = isinstance(_split_kernel, InterpretedFunction)
    # Triton launches on the current GPU, which need not be q's.
    # Head rows and dims are padded to powers of two (tl.arange needs them); masks hide the padding.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _split_kernel[(head_blocks, num_splits, n_tok)](
            q, q.stride(0), q.stride(1), q.stride(2),
            qpe, qpe.stride(0), qpe.stride(1), qpe.stride(2),
            cache, cache.stride(0),
            block_tables, block_tables.stride(0),
            seq_of_token, positions,
            o_part, o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse, lse.stride(0), lse.stride(1),
            scale * _LOG2E, window or 0, group, num_splits,
            d1, d2, dv, k_col_per_head, d1, v_col, v_col_per_head, scale_col, groups,
            BLOCK_SIZE=block_size, BLOCK_H=block_h, BLOCK_N=block_n, MIN_CHUNK=min_chunk,
            BLOCK_D1=_pow2(d1), BLOCK_D2=_pow2(d2), BLOCK_DV=_pow2(dv),
            HAS_PE=has_pe, V_IS_K=v_is_k, HAS_WINDOW=window is not None,
            DIRECT=direct, FP32=fp32, KV_INT8=int8, INT8_GROUP=KV_INT8_GROUP, DOT_PRECISION="ieee" if fp32 else "tf32",
            DOT_UPCAST=interpreted and not fp32, WHILE_LOOP=interpreted,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if not direct:
            dv_chunk = min(64, _pow2(dv))
            _reduce_kernel[(nh, n_tok, triton.cdiv(dv, dv_chunk))](
                o_part, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                lse, lse.stride(0), lse.stride(1),
                out, out.stride(0), out.stride(1),
                dv, num_splits, BLOCK_S=triton.next_power_of_2(num_splits), DV_CHUNK=dv_chunk, num_warps=4,
            )
    return out


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _split_kernel(
    q_ptr, q_st, q_sh, q_sd,  # [T, nh, D1] query against the K columns (MLA: q_lat)
    qpe_ptr, qpe_st, qpe_sh, qpe_sd,  # [T, nh, D2] query against the rope key (MLA only)
    cache_ptr, cache_sr,  # [rows, width]
    bt_ptr, bt_sb,  # [B, max_blocks] int32
    seq_ptr, pos_ptr,  # [T], [T]
    o_ptr, o_st, o_sh, o_ss,  # DIRECT: out [T, nh, DV]; else fp32 partials [T, nh, S, DV]
    lse_ptr, lse_st, lse_sh,  # [T, nh, S] fp32, log2 units
    qk_scale, window, group, num_splits,
    D1, D2, DV, k_col_per_head, pe_col, v_col, v_col_per_head, scale_col, groups,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PE: tl.constexpr, V_IS_K: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr, FP32: tl.constexpr, KV_INT8: tl.constexpr, INT8_GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    # Head blocks vary fastest in launch order, so the programs reading one chunk run together
    # and the heads beyond the first block find its tiles in L2.
    hb, split, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    blocks_per_group = tl.cdiv(group, BLOCK_H)
    kvh = hb // blocks_per_group
    h_in_group = (hb % blocks_per_group) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h_in_group < group
    heads = kvh * group + h_in_group  # [BLOCK_H]
    t64 = t.to(tl.int64)

    seq = tl.load(seq_ptr + t).to(tl.int64)
    kv_hi = tl.load(pos_ptr + t).to(tl.int32) + 1  # keys [kv_lo, kv_hi); padding tokens: kv_hi <= 0
    kv_lo = kv_hi * 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(kv_hi - window, 0)
    kv_len = tl.maximum(kv_hi - kv_lo, 0)
    # Chunks follow this token's own length, so every split shares the work of a long context.
    chunk = tl.maximum(tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N, MIN_CHUNK)
    lo = kv_lo + split * chunk
    hi = tl.minimum(lo + chunk, kv_hi)

    d1 = tl.arange(0, BLOCK_D1)
    q = tl.load(
        q_ptr + t64 * q_st + heads[:, None] * q_sh + d1[None, :] * q_sd,
        mask=h_mask[:, None] & (d1[None, :] < D1), other=0.0,
    )  # [BLOCK_H, BLOCK_D1]
    cdt = q_ptr.dtype.element_ty if KV_INT8 else cache_ptr.dtype.element_ty  # int8 rows: dequantized to q's
    q = q.to(tl.float32) if FP32 else q.to(cdt)
    qpe = q  # placeholder when there is no rope part
    if HAS_PE:
        d2 = tl.arange(0, BLOCK_D2)
        qpe = tl.load(
            qpe_ptr + t64 * qpe_st + heads[:, None] * qpe_sh + d2[None, :] * qpe_sd,
            mask=h_mask[:, None] & (d2[None, :] < D2), other=0.0,
        )  # [BLOCK_H, BLOCK_D2]
        qpe = qpe.to(tl.float32) if FP32 else qpe.to(cdt)
    k_col = kvh * k_col_per_head
    v_col_h = v_col + kvh * v_col_per_head

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    bt_row = bt_ptr + seq * bt_sb
    if WHILE_LOOP:
        # The interpreter cannot take tensor bounds in range() (numpy >= 2 refuses int() of its
        # 1-element scalars); compiled code keeps the for loop, which Triton software-pipelines.
        start = lo
        while start < hi:
            m_i, l_i, acc = _attend_tile(
                start, hi, m_i, l_i, acc, q, qpe, cache_ptr, cache_sr, bt_row, qk_scale,
                D1, D2, DV, k_col, pe_col, v_col_h, scale_col, groups,
                BLOCK_SIZE, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, HAS_PE, V_IS_K, FP32, KV_INT8, INT8_GROUP,
                DOT_PRECISION, DOT_UPCAST,
            )
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                start, hi, m_i, l_i, acc, q, qpe, cache_ptr, cache_sr, bt_row, qk_scale,
                D1, D2, DV, k_col, pe_col, v_col_h, scale_col, groups,
                BLOCK_SIZE, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, HAS_PE, V_IS_K, FP32, KV_INT8, INT8_GROUP,
                DOT_PRECISION, DOT_UPCAST,
            )

    dv = tl.arange(0, BLOCK_DV)
    has_keys = l_i > 0  # False for empty splits and padding tokens
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_mask = h_mask[:, None] & (dv[None, :] < DV)
    o_ptrs = o_ptr + t64 * o_st + heads[:, None] * o_sh + dv[None, :]
    if DIRECT:
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=o_mask)
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + t64 * lse_st + heads * lse_sh + split, lse, mask=h_mask)
        # Empty splits write only -inf. The scalar test is broadcast to a block: Triton 3.9's
        # interpreter rejects a mask of a block & a scalar.
        tl.store(o_ptrs + split * o_ss, o, mask=o_mask & (dv[None, :] * 0 + hi > lo))


@triton.jit
def _attend_tile(
    start, hi, m_i, l_i, acc, q, qpe, cache_ptr, cache_sr, bt_row, qk_scale,
    D1, D2, DV, k_col, pe_col, v_col, scale_col, groups,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PE: tl.constexpr, V_IS_K: tl.constexpr, FP32: tl.constexpr, KV_INT8: tl.constexpr,
    INT8_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One tile of keys start..start+BLOCK_N-1 (those < hi) folded into the online softmax."""
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < hi
    blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0)
    # Row pointers: the block's first row and the row within the block are scaled by the stride
    # apart. Triton without triton-lang/triton#9297 (AxisInfo of add) takes the sum
    # blk * BLOCK_SIZE + n % BLOCK_SIZE as a multiple of BLOCK_SIZE in every element, so it took
    # every row as 16-byte aligned whatever the stride and loaded 16 bytes of codes at once: a
    # misaligned address on int8 rows of 612 bytes, only 4-aligned. Each term here has a sound
    # divisibility (bf16 rows of 1152 bytes still load in 16-byte vectors). int8 rows are whole
    # 4-byte words (mla_int8_layout; mla_decode checks), which lets codes load as words.
    if KV_INT8:
        cache_sr = cache_sr // 4 * 4  # the same stride, known to Triton as a multiple of 4
    row = cache_ptr + blk.to(tl.int64) * BLOCK_SIZE * cache_sr + (n % BLOCK_SIZE) * cache_sr  # [BLOCK_N]
    # Masked keys load as zeros, so stale or NaN rows past the context never reach the sums.
    d1 = tl.arange(0, BLOCK_D1)
    k_mask = n_mask[:, None] & (d1[None, :] < D1)
    if KV_INT8:  # code x its group's scale, in the query's dtype
        codes = tl.load(row[:, None] + k_col + d1[None, :], mask=k_mask, other=0).to(tl.int8, bitcast=True)
        scales = tl.load((row[:, None] + scale_col + 4 * (d1[None, :] // INT8_GROUP)).to(
            tl.pointer_type(tl.float32), bitcast=True), mask=k_mask, other=0.0)
        k = (codes.to(tl.float32) * scales).to(q.dtype)
    else:
        k = tl.load(row[:, None] + k_col + d1[None, :], mask=k_mask, other=0.0)
        k = k.to(tl.float32) if FP32 else k
    s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)  # [BLOCK_H, BLOCK_N]
    if HAS_PE:
        d2 = tl.arange(0, BLOCK_D2)
        pe_mask = n_mask[:, None] & (d2[None, :] < D2)
        if KV_INT8:
            codes = tl.load(row[:, None] + pe_col + d2[None, :], mask=pe_mask, other=0).to(tl.int8, bitcast=True)
            pe_scale = tl.load((row + scale_col + 4 * groups).to(tl.pointer_type(tl.float32), bitcast=True),
                               mask=n_mask, other=0.0)
            kpe = (codes.to(tl.float32) * pe_scale[:, None]).to(qpe.dtype)
        else:
            kpe = tl.load(row[:, None] + pe_col + d2[None, :], mask=pe_mask, other=0.0)
            kpe = kpe.to(tl.float32) if FP32 else kpe
        s += _dot(qpe, tl.trans(kpe), DOT_PRECISION, DOT_UPCAST)
    s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_IS_K:
        v = k  # MLA: the values are the latent itself
    else:
        dv = tl.arange(0, BLOCK_DV)
        v = tl.load(row[:, None] + v_col + dv[None, :], mask=n_mask[:, None] & (dv[None, :] < DV), other=0.0)
        v = v.to(tl.float32) if FP32 else v
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return m_new, l_i, acc


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter multiplies bf16 operands as their raw uint16 bits; exact fp32 copies of the
    # same (already rounded) values give what the tensor cores compute.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _reduce_kernel(
    o_ptr, o_st, o_sh, o_ss,  # [T, nh, S, DV] fp32 partial outputs
    lse_ptr, lse_st, lse_sh,  # [T, nh, S] fp32 log2-sum-exp; -inf marks an empty split
    out_ptr, out_st, out_sh,  # [T, nh, DV]
    DV, num_splits, BLOCK_S: tl.constexpr, DV_CHUNK: tl.constexpr,
):
    # No loops: one program merges all splits of one [DV_CHUNK] slice of one head's output.
    h, t, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_ptr + t * lse_st + h * lse_sh + s, mask=s < num_splits, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a padding token: every weight below is 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    dv = chunk * DV_CHUNK + tl.arange(0, DV_CHUNK)
    # An empty split never wrote its partial output: do not read it.
    o = tl.load(
        o_ptr + t * o_st + h * o_sh + s[:, None] * o_ss + dv[None, :],
        mask=(lse > float("-inf"))[:, None] & (dv[None, :] < DV), other=0.0,
    )  # [BLOCK_S, DV_CHUNK]
    out = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + t * out_st + h * out_sh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)
