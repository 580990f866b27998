"""Attention layers. MLA (DeepSeek multi-head latent attention) caches one compressed latent and
one shared rope key per token instead of per-head keys and values. GQA (grouped-query attention:
Qwen-MoE, Mixtral) caches per-KV-head keys and values, [K | V] in one cache row.

Data path (MLA): x -> q (optionally through a low-rank q_a/q_b pair), x -> [latent | k_pe];
rope on q_pe and k_pe; write [latent | k_pe] to the paged cache; attend per sequence.
Data path (GQA): x -> q, k, v (optional bias) -> optional per-head q/k RMSNorm -> rope on q, k;
write [k | v] to the paged cache; attend per sequence (optionally within a sliding window).
"""

import functools
from dataclasses import dataclass

import torch
from torch import nn

from tandem.errors import TandemError
from tandem.layers.linear import Linear
from tandem.layers.meta import ForwardMeta
from tandem.layers.norm import FUSED_MAX_WIDTH, RMSNorm, fused_ops, fused_path
from tandem.layers.rope import Rope, RopeConfig
from tandem.ops import reference as ops
from tandem.ops import sdpa

# Steps whose sequences feed at most this many new tokens each attend through the paged decode
# kernels when the runner provides their tensors (ForwardMeta.kernels); longer ones (prefill) in torch.
DECODE_MAX_QUERIES = 4
# MLA prefill expands at most this many context tokens' keys and values at once (DeepSeek-V3: ~117 KB
# a token in bf16, 0.96 GB); longer contexts attend in chunks of it. Shorter ones take torch's SDPA.
PREFILL_KV_CHUNK = 8192


def attn_kernels():
    """ops.triton.attention, imported on first use (importing triton is slow and needs a GPU or
    the interpreter)."""
    from tandem.ops.triton import attention

    return attention


def prefill_kernels():
    """ops.triton.prefill (chunked prefill attention with log-sum-exp), imported on first use."""
    from tandem.ops.triton import prefill

    return prefill


def prefill_attention(x: torch.Tensor):
    """Torch's fused attention on a GPU (no fp32 score matrix); the plain reference on the CPU."""
    return sdpa.attention if x.is_cuda else ops.attention


def prefill_attention_lse(x: torch.Tensor):
    """Attention over one chunk of the context with its log-sum-exp: the Triton kernel on a GPU, the
    reference on the CPU."""
    return prefill_kernels().attention_lse if x.is_cuda else ops.attention_lse


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors the decode kernels' splits are sized for (CPU: the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    bias: bool = False

    @property
    def cache_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


class MLAttention(nn.Module):
    # Decode steps (<= DECODE_MAX_QUERIES new tokens per sequence) attend in latent space; prefill
    # expands K/V, which costs fewer FLOPs when many queries share the context, kv_chunk context
    # tokens at a time.
    kv_chunk = PREFILL_KV_CHUNK
    kv_int8 = False  # cache rows of int8 codes + fp32 scales (ops.reference.mla_int8_layout)

    def __init__(self, cfg: MLAConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * qk_dim)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = Linear(cfg.q_lora_rank, cfg.num_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = Linear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size, bias=cfg.bias)
        self.rope = Rope(cfg.rope)
        self.scale = qk_dim**-0.5 * cfg.rope.softmax_scale_factor()
        self.q_kv_a = None  # one layer computing [q (or q_a) | latent | k_pe] once merged (merge_q_kv_a)

    @property
    def q_in(self) -> nn.Module:
        """The projection of x that starts q: q_proj, or q_a_proj with a low-rank q."""
        return self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj

    def merge_q_kv_a(self, q_kv_a: nn.Module) -> None:
        """Serve q_in and kv_a_proj_with_mqa (both read x) from one layer whose output is their two
        outputs side by side (one GEMV, not two; the runtime merges GPU block layers this way when
        both share a format)."""
        if self.cfg.q_lora_rank is None:
            del self.q_proj
        else:
            del self.q_a_proj
        del self.kv_a_proj_with_mqa
        self.q_kv_a = q_kv_a

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, nh * (dn + dr)], kv [T, latent | k_pe]) of x."""
        cfg = self.cfg
        if self.q_kv_a is None:
            q = self.q_in(x)
            kv = self.kv_a_proj_with_mqa(x)
        else:  # contiguous() copies only in prefill: one row of a decode step is contiguous as it is
            width = cfg.q_lora_rank or cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
            q, kv = (t.contiguous() for t in self.q_kv_a(x).split([width, cfg.kv_lora_rank + cfg.qk_rope_head_dim], -1))
        if cfg.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        return q, kv

    @property
    def cache_width(self) -> int:
        c, dr = self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim
        return ops.mla_int8_layout(c, dr)[2] if self.kv_int8 else c + dr

    def _cache_values(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Cache rows -> [n, latent | k_pe] in dtype."""
        if self.kv_int8:
            return ops.mla_int8_values(rows, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim).to(dtype)
        return rows.to(dtype)

    def forward(self, x: torch.Tensor, meta: ForwardMeta, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n_tok, nh, dn, dr, dv = x.shape[0], cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q, kv = self._project(x)  # kv: [T, latent | k_pe]
        q_nope, q_pe = q.view(n_tok, nh, dn + dr).split([dn, dr], dim=-1)
        q_pe = self.rope(q_pe, cos, sin)  # [T, nh, dr]
        cache = meta.kv[self.layer_idx]
        norm = self.kv_a_layernorm
        if fused_path(kv) and cfg.kv_lora_rank <= FUSED_MAX_WIDTH:  # norm, rope and the cache write in one kernel
            fused_ops().mla_cache_write(kv, norm.weight, norm.eps, cos, sin, cache, meta.slot_mapping,
                                        cfg.kv_lora_rank, cfg.rope.interleaved)
        else:
            latent, k_pe = kv.split([cfg.kv_lora_rank, dr], dim=-1)
            latent, k_pe = norm(latent), self.rope(k_pe, cos, sin)
            if self.kv_int8:
                cache[meta.slot_mapping] = ops.mla_int8_rows(latent, k_pe)
            else:
                cache[meta.slot_mapping] = torch.cat((latent, k_pe), dim=-1).to(cache.dtype)

        w_kv_b = self.kv_b_proj.weight.view(nh, dn + dv, cfg.kv_lora_rank)
        if meta.kernels and meta.max_query_len <= DECODE_MAX_QUERIES:
            # Latent space for all sequences at once: q_lat = q_nope W_UK, attend, then W_UV.
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_kv_b[:, :dn])  # [nh, T, c]
            kernels = attn_kernels()
            splits = kernels.default_splits(meta.max_context, n_tok, nh, 1, num_sms(x.device))
            o_lat = kernels.mla_decode(
                q_lat.transpose(0, 1), q_pe, cache, meta.block_table, meta.seq_of_token, meta.positions,
                meta.block_size, self.scale, splits,
            )  # [T, nh, c]
            out = torch.bmm(o_lat.to(x.dtype).transpose(0, 1), w_kv_b[:, dn:].transpose(1, 2))  # [nh, T, dv]
            return self.o_proj(out.transpose(0, 1).reshape(n_tok, nh * dv))
        out = torch.empty(n_tok, nh, dv, dtype=x.dtype, device=x.device)
        for s in range(meta.num_seqs):
            a, b = meta.query_start[s], meta.query_start[s + 1]
            slots = meta.context_slots(s)
            offset = meta.context_lens[s] - (b - a)
            if b - a <= DECODE_MAX_QUERIES:
                c_ctx, kpe_ctx = self._cache_values(cache[slots], x.dtype).split([cfg.kv_lora_rank, dr], dim=-1)
                out[a:b] = ops.mla_attention_absorbed(
                    q_nope[a:b], q_pe[a:b], c_ctx, kpe_ctx, w_kv_b[:, :dn], w_kv_b[:, dn:], self.scale, offset
                )
            else:
                out[a:b] = self._prefill(q_nope[a:b], q_pe[a:b], cache, slots, offset)
        return self.o_proj(out.view(n_tok, nh * dv))

    def _expand(self, rows: torch.Tensor, dtype: torch.dtype):
        """Cache rows [n, latent | k_pe] -> per-head k_nope [n, nh, dn] and v [n, nh, dv], and k_pe [n, dr]."""
        cfg = self.cfg
        latent, k_pe = self._cache_values(rows, dtype).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(-1, cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        return k_nope, v, k_pe

    def _prefill(self, q_nope, q_pe, cache, slots, offset: int) -> torch.Tensor:
        """One sequence's prompt chunk over its context with expanded keys and values, at most
        kv_chunk context tokens of them at a time: a longer context attends chunk by chunk and
        the chunks' outputs merge through their log-sum-exp, so memory stays bounded at any length."""
        if len(slots) <= self.kv_chunk:
            k_nope, v, k_pe = self._expand(cache[slots], q_nope.dtype)
            k = torch.cat((k_nope, k_pe[:, None, :].expand(-1, self.cfg.num_heads, -1)), dim=-1)
            return prefill_attention(q_nope)(torch.cat((q_nope, q_pe), dim=-1), k, v, self.scale, offset)
        attend = prefill_attention_lse(q_nope)
        o = lse = None
        for start in range(0, len(slots), self.kv_chunk):
            k_nope, v, k_pe = self._expand(cache[slots[start : start + self.kv_chunk]], q_nope.dtype)
            o_c, lse_c = attend(q_nope, k_nope, v, self.scale, offset, start, q_pe=q_pe, k_pe=k_pe)
            o, lse = (o_c, lse_c) if o is None else ops.merge_attention(o, lse, o_c, lse_c)
        return o.to(q_nope.dtype)


@dataclass(frozen=True)
class GQAConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # independent of hidden_size / num_heads (Qwen3)
    rope: RopeConfig
    qkv_bias: bool = False  # Qwen2-MoE
    o_bias: bool = False  # Qwen3's attention_bias puts a bias on o_proj too
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of each q and k head, before rope
    sliding_window: int | None = None  # a query sees itself and the window - 1 tokens before it
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.num_heads < 1 or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise TandemError(
                f"attention heads ({self.num_heads}) must be a positive multiple of key/value heads ({self.num_kv_heads})"
            )
        if self.rope.dim != self.head_dim:
            raise TandemError(f"rope dim {self.rope.dim} must equal head_dim {self.head_dim} (partial rotary is not supported)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise TandemError(f"sliding_window must be at least 1, got {self.sliding_window}")

    @property
    def cache_width(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim


class GQAttention(nn.Module):
    @property
    def cache_width(self) -> int:
        return self.cfg.cache_width

    def __init__(self, cfg: GQAConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, nh, nkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(h, nh * d, bias=cfg.qkv_bias)
        self.k_proj = Linear(h, nkv * d, bias=cfg.qkv_bias)
        self.v_proj = Linear(h, nkv * d, bias=cfg.qkv_bias)
        self.o_proj = Linear(nh * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps)
            self.k_norm = RMSNorm(d, cfg.norm_eps)
        self.rope = Rope(cfg.rope)
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor, meta: ForwardMeta, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n_tok, nh, nkv, d, window = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window
        q = self.q_proj(x).view(n_tok, nh, d)
        k = self.k_proj(x).view(n_tok, nkv, d)
        v = self.v_proj(x).view(n_tok, nkv, d)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)

        cache = meta.kv[self.layer_idx]
        cache[meta.slot_mapping] = torch.cat((k.reshape(n_tok, -1), v.reshape(n_tok, -1)), dim=-1).to(cache.dtype)
        if meta.kernels and meta.max_query_len <= DECODE_MAX_QUERIES:
            kernels = attn_kernels()
            splits = kernels.default_splits(meta.max_context, n_tok, nh, nkv, num_sms(x.device))
            out = kernels.gqa_decode(
                q, cache, meta.block_table, meta.seq_of_token, meta.positions, meta.block_size, self.scale,
                nkv, splits, window,
            )
            return self.o_proj(out.to(x.dtype).reshape(n_tok, nh * d))

        out = torch.empty(n_tok, nh, d, dtype=x.dtype, device=x.device)
        for s in range(meta.num_seqs):
            a, b = meta.query_start[s], meta.query_start[s + 1]
            offset = meta.context_lens[s] - (b - a)  # absolute position of the first new token
            # With a window, keys older than the first query's window are never read.
            first = 0 if window is None else max(0, offset - window + 1)
            ctx = cache[meta.context_slots(s)[first:]].to(x.dtype)
            k_ctx, v_ctx = ctx.view(-1, 2, nkv, d).unbind(1)
            out[a:b] = prefill_attention(x)(q[a:b], k_ctx, v_ctx, self.scale, offset - first, window)
        return self.o_proj(out.view(n_tok, nh * d))
