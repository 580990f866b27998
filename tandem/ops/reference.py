"""Plain-torch reference operators: the executable spec every faster kernel is tested against.

Stateless functions only. Shapes use T = tokens of a step (all sequences flattened), H = hidden
size, E = experts, k = experts per token.
"""

import itertools
import math

import torch
import torch.nn.functional as F

from tandem.ops.staging import to_device


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in fp32 whatever the storage dtype, as every reference implementation does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU feed-forward: down(silu(gate x) * up x); weights in nn.Linear layout [out, in]."""
    return F.linear(silu_mul(F.linear(x, w_gate), F.linear(x, w_up)), w_down)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x [T, ..., d] by per-token angles; cos/sin are [T, d/2].

    interleaved: pairs are (x[2i], x[2i+1]) as in DeepSeek checkpoints; else (x[i], x[i+d/2]).
    The output keeps the input layout, so cached keys and queries stay comparable.
    """
    shape = [cos.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[-1]]
    c, s = cos.view(shape), sin.view(shape)
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int, window: int | None = None
) -> torch.Tensor:
    """Causal attention of one sequence. q [Tq, nh, d], k [Tk, nkv, d], v [Tk, nkv, dv] -> [Tq, nh, dv].

    Query i sits at absolute position p = q_offset + i and sees keys max(0, p - window + 1)..p (all
    keys up to p when window is None). Grouped-query attention: nh is a multiple of nkv and query
    head h reads key/value head h // (nh // nkv), as HF's repeat_kv lays them out.
    """
    return attention_lse(q, k, v, scale, q_offset, window=window)[0].to(q.dtype)


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_offset: int,
    k_offset: int = 0,
    *,
    window: int | None = None,
    q_pe: torch.Tensor | None = None,
    k_pe: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` over one chunk of a sequence's keys, with the log-sum-exp that lets chunks merge
    (`merge_attention`): the contract of ops/triton/prefill.attention_lse.

    Keys sit at positions k_offset + j. q_pe [Tq, nh, d2] / k_pe [Tk, d2]: a key part shared by
    every head (MLA's rope key). -> o fp32 [Tq, nh, dv], lse fp32 [Tq, nh] (natural log of the
    softmax denominator); a query that sees no key of the chunk gets o = 0 and lse = -inf.
    """
    if q_pe is not None:
        q = torch.cat((q, q_pe), dim=-1)
        k = torch.cat((k, k_pe[:, None, :].expand(-1, k.shape[1], -1)), dim=-1)
    tq, nh, tk, nkv = q.shape[0], q.shape[1], k.shape[0], k.shape[1]
    qg = q.float().view(tq, nkv, nh // nkv, q.shape[-1])
    scores = torch.einsum("qkgd,tkd->kgqt", qg, k.float()) * scale  # [nkv, g, Tq, Tk]
    pos = q_offset + torch.arange(tq, device=q.device)[:, None]
    key = k_offset + torch.arange(tk, device=q.device)[None, :]
    visible = key <= pos
    if window is not None:
        visible &= key > pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [nkv, g, Tq]
    probs = torch.where(lse.isinf()[..., None], 0.0, scores.softmax(dim=-1))  # no key seen: zeros, not NaN
    out = torch.einsum("kgqt,tkd->qkgd", probs, v.float()).reshape(tq, nh, v.shape[-1])
    return out, lse.permute(2, 0, 1).reshape(tq, nh)


def merge_attention(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint key sets from each one's (o [..., dv], lse [...]) -> the same
    pair over their union. Sets nobody saw (lse = -inf) weigh nothing."""
    lse = torch.logaddexp(lse1, lse2)
    ref = torch.where(lse.isinf(), 0.0, lse)[..., None]
    out = o1 * torch.exp(lse1[..., None] - ref) + o2 * torch.exp(lse2[..., None] - ref)
    return out, lse


def route(
    logits: torch.Tensor,
    *,
    top_k: int,
    scoring: str,
    topk_method: str,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick k experts per token from router logits [T, E] (fp32).

    Returns ids [T, k] int32 and weights [T, k] fp32. scoring: 'softmax' or 'sigmoid'.
    topk_method: 'greedy' (plain top-k), 'group_limited_greedy' (DeepSeek-V2: keep the topk_group
    groups with the best single expert), 'noaux_tc' (DeepSeek-V3: groups ranked by the sum of their
    two best bias-corrected scores; the bias only chooses, the weights come from the raw scores).
    """
    logits = logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    n_tokens, n_experts = scores.shape
    if topk_method in ("group_limited_greedy", "noaux_tc") and n_group > 1:
        grouped = choice.view(n_tokens, n_group, n_experts // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        # Masked experts must never win: -inf for sigmoid+bias (scores may be negative), 0 suffices
        # for softmax probabilities and matches the original implementation bit for bit.
        fill = 0.0 if topk_method == "group_limited_greedy" else float("-inf")
        choice = choice.masked_fill(~mask.repeat_interleave(n_experts // n_group, dim=1), fill)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return ids.to(torch.int32), weights


def moe_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Routed experts: out[t] = sum_j weights[t,j] * mlp_{ids[t,j]}(x[t]).

    x [T, H]; ids [T, k] int32 (-1 = no expert); weights [T, k] fp32; w_gate/w_up [E, I, H]; w_down [E, H, I].
    Tokens are grouped by expert so each expert's weights are read once per call.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1).long()
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=w_gate.shape[0]).tolist()
    start = int((flat_ids < 0).sum())  # padding (-1) sorts first
    k = ids.shape[1]
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start : start + count]
        start += count
        tokens = slots // k
        y = mlp(x[tokens], w_gate[expert], w_up[expert], w_down[expert])
        out.index_add_(0, tokens, y.float() * weights.reshape(-1)[slots, None].float())
    return out.to(x.dtype)


def moe_experts_padded(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    w_down: torch.Tensor, counts: list[int],
) -> torch.Tensor:
    """moe_experts in a fixed number of batched matmuls: each expert's tokens gathered into rows of
    [E, max(counts), H] (padding rows compute on zeros and are dropped), so a device launches ~10
    kernels however many experts run. counts: tokens per expert (ids' histogram), known on the host.
    Same roundings as moe_experts (x.dtype matmuls, fp32 weighted sum); only the matmuls' internal
    summation order may differ."""
    rows = max(counts, default=0)
    if rows == 0:
        return torch.zeros_like(x)
    n_exp, (n_tok, k) = w_gate.shape[0], ids.shape
    flat = ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    valid = order[n_tok * k - sum(counts):]  # padding (-1) sorts first; counts says how many (no host sync)
    expert = flat[valid]
    # Each expert's first row, from the host's counts: through pinned memory on a GPU, so the
    # copy is queued like the kernels around it (a pageable source would make the host wait).
    start = to_device(list(itertools.accumulate([0] + counts[:-1])), torch.int64, x.device)
    rank = torch.arange(valid.numel(), device=x.device) - start[expert]
    slot = torch.full((n_exp, rows), n_tok * k, dtype=torch.long, device=x.device)  # n_tok * k: a zero row
    slot[expert, rank] = valid
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])])
    w_pad = torch.cat([weights.reshape(-1).float(), weights.new_zeros(1, dtype=torch.float32)])
    tok = torch.where(slot < n_tok * k, slot // k, n_tok)  # [E, rows]
    xs = x_pad[tok]  # [E, rows, H]
    h = silu_mul(torch.bmm(xs, w_gate.transpose(1, 2)), torch.bmm(xs, w_up.transpose(1, 2)))
    y = torch.bmm(h, w_down.transpose(1, 2))  # [E, rows, H]
    summed = torch.zeros((n_tok + 1, x.shape[1]), dtype=torch.float32, device=x.device)
    summed.index_add_(0, tok.reshape(-1), (y.float() * w_pad[slot].unsqueeze(-1)).reshape(-1, x.shape[1]))
    return summed[:n_tok].to(x.dtype)


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *dims: int) -> bool:
    """Whether torch's grouped matmul (moe_experts_grouped) runs matrices of `dtype` on `device`
    whose rows are `dims` long without a host sync: a torch that has it; on CUDA bf16 on compute
    capability 9.x / 10.x, where torch has grouped kernels (elsewhere it loops over the groups
    after copying the offsets to the host: a sync a call, so the padded batched matmuls serve
    better); fp32 or bf16 on the CPU; every row a multiple of 16 bytes (the kernels' alignment)."""
    if _GROUPED_MM is None:
        return False
    if device.type == "cuda":
        ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
    else:
        ok = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    return ok and all(d * dtype.itemsize % 16 == 0 for d in dims)


def joined_halves(w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor | None:
    """w_gate and w_up [E, I, H] as the one [E, 2I, H] tensor they are the halves of (each expert's
    gate rows, then its up rows: how the dual path decodes them), else None."""
    e, i, h = w_gate.shape
    size = w_gate.element_size()
    if (w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype or w_gate.stride() != (2 * i * h, h, 1)
            or w_up.stride() != w_gate.stride() or w_up.data_ptr() != w_gate.data_ptr() + i * h * size
            or w_up.untyped_storage().data_ptr() != w_gate.untyped_storage().data_ptr()):
        return None
    return w_gate.as_strided((e, 2 * i, h), w_gate.stride())


def moe_experts_grouped(
    x: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
    w_down: torch.Tensor, counts: list[int], out: torch.Tensor,
) -> torch.Tensor:
    """moe_experts over rows sorted by expert, in three grouped matmuls (no padding rows): the
    first counts[0] rows are expert 0's (of w_gate, w_up [E, I, H], w_down [E, H, I]), the next
    counts[1] expert 1's, ...; row r is token tokens[r] of x [T, H] with routing weight
    weights[r] (fp32). Adds the weighted outputs into out [T, H] (fp32) and returns it. Same
    roundings as moe_experts (x.dtype matmuls, fp32 weighted sum); counts is known on the host."""
    if tokens.numel() == 0:
        return out
    # Each expert's last row, from the host: through pinned memory on a GPU, so the copy queues
    # like the kernels around it.
    offs = to_device(list(itertools.accumulate(counts)), torch.int32, x.device)
    xs = x[tokens]
    gate_up = joined_halves(w_gate, w_up)
    if gate_up is not None:  # one matmul for both, their outputs side by side
        gu = _GROUPED_MM(xs, gate_up.transpose(1, 2), offs=offs)
        h = silu_mul(gu[:, : w_gate.shape[1]], gu[:, w_gate.shape[1] :])
        del gu  # freed before down's output, as the two separate outputs are
    else:
        h = silu_mul(_GROUPED_MM(xs, w_gate.transpose(1, 2), offs=offs), _GROUPED_MM(xs, w_up.transpose(1, 2), offs=offs))
    y = _GROUPED_MM(h, w_down.transpose(1, 2), offs=offs)
    # y in x's dtype times fp32 weights promotes to fp32 in one kernel: y.float() * w, rounded the
    # same, without the fp32 copy of y (8K V2-Lite steps: ~100 MB a run)
    return out.index_add_(0, tokens, y * weights.float().unsqueeze(-1))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction for a context stretched by `factor`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


KV_INT8_GROUP = 64  # latent values per scale in the int8 MLA cache (the rope key has one scale)


def mla_int8_layout(c: int, dr: int) -> tuple[int, int, int]:
    """(groups, scale byte offset, row bytes) of an int8 MLA cache row: c + dr int8 values
    (latent | rope key), padded to 4 bytes, then fp32 scales: one per KV_INT8_GROUP latent values
    (ceil(c / 64) of them) and one for the rope key. DeepSeek-V2/V3 (c 512, dr 64): 612 bytes, not 1152."""
    groups = -(-c // KV_INT8_GROUP)
    offset = -(-(c + dr) // 4) * 4
    return groups, offset, offset + 4 * (groups + 1)


def _quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., g] fp32 -> int8 codes and one fp32 scale per row of g: code = round(x / scale) (half
    away from zero), scale = max|x| / 127 (1 for a zero row). The kernels compute the same ops."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    y = x / scale
    return (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-127, 127).to(torch.int8), scale


def mla_int8_rows(latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """latent [n, c], k_pe [n, dr] (already normalized / rotated and rounded to the model's dtype)
    -> int8 cache rows uint8 [n, row bytes] (mla_int8_layout)."""
    n, c, dr = latent.shape[0], latent.shape[1], k_pe.shape[1]
    groups, offset, width = mla_int8_layout(c, dr)
    lat = torch.nn.functional.pad(latent.float(), (0, groups * KV_INT8_GROUP - c)).view(n, groups, KV_INT8_GROUP)
    lat_q, lat_s = _quantize_int8(lat)
    pe_q, pe_s = _quantize_int8(k_pe.float())
    rows = torch.zeros(n, width, dtype=torch.uint8, device=latent.device)
    rows[:, :c] = lat_q.view(n, -1)[:, :c].view(torch.uint8)
    rows[:, c : c + dr] = pe_q.view(torch.uint8)
    rows[:, offset:] = torch.cat((lat_s[..., 0], pe_s), dim=1).contiguous().view(torch.uint8)
    return rows


def mla_int8_values(rows: torch.Tensor, c: int, dr: int) -> torch.Tensor:
    """int8 cache rows uint8 [n, row bytes] -> fp32 [n, c + dr] (latent | rope key), code x scale."""
    groups, offset, _ = mla_int8_layout(c, dr)
    codes = rows[:, : c + dr].contiguous().view(torch.int8).float()
    scales = rows[:, offset : offset + 4 * (groups + 1)].contiguous().view(torch.float32)  # [n, groups + 1]
    per_value = torch.cat((scales[:, :groups].repeat_interleave(KV_INT8_GROUP, dim=1)[:, :c],
                           scales[:, groups:].expand(-1, dr)), dim=1)
    return codes * per_value


def mla_attention_absorbed(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    scale: float,
    q_offset: int,
) -> torch.Tensor:
    """Multi-head latent attention of one sequence over its compressed cache (weight absorption).

    q_nope [Tq, nh, dn], q_pe [Tq, nh, dr], latent [Tk, c], k_pe [Tk, dr], w_uk [nh, dn, c],
    w_uv [nh, dv, c] -> [Tq, nh, dv]. The key up-projection is folded into the query and the value
    up-projection applied after the softmax, so per-head keys/values are never materialized.
    """
    q_lat = torch.einsum("qhd,hdc->qhc", q_nope.float(), w_uk.float())
    scores = torch.einsum("qhc,kc->hqk", q_lat, latent.float()) + torch.einsum("qhr,kr->hqk", q_pe.float(), k_pe.float())
    tq, tk = q_nope.shape[0], latent.shape[0]
    visible = torch.arange(tk, device=latent.device)[None, :] <= (q_offset + torch.arange(tq, device=latent.device))[:, None]
    probs = (scores * scale).masked_fill(~visible, float("-inf")).softmax(dim=-1)
    out_lat = torch.einsum("hqk,kc->qhc", probs, latent.float())
    return torch.einsum("qhc,hvc->qhv", out_lat, w_uv.float()).to(q_nope.dtype)
