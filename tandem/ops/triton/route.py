"""MoE routing in one kernel: scores, DeepSeek's group choice, top-k and the weights.

route_x    x [T, H], router weight fp32 [E, H] -> as route, with the logits computed in the same
           launch (decode steps: grid (T, expert blocks); each token's last block to arrive,
           ops/triton/arrive.py, routes it from its stored logits row): one launch a MoE layer
           instead of a cast, a GEMV (two kernels in cuBLAS) and route's.

route      logits [T, E] -> ids int32 [T, k] (best first, as torch.topk), weights fp32 [T, k].
           One program per token holding all E experts as a [groups, group size] tile (greedy:
           one group of E): scores (softmax / sigmoid) -> choice (+ correction bias) -> for
           DeepSeek's group methods, keep the topk_group best groups -> k rounds of
           argmax-and-mask (ties: lowest id) -> weights = raw scores of the picks, normalized and
           scaled as the reference does.

Semantics are exactly tandem.ops.reference.route's; no host syncs and a grid from shapes only, so
a decode step that routes can be captured in a CUDA graph.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from tandem.ops.triton.arrive import arrive, counters
from tandem.ops.triton.fused import _check_device, _check_float, _on, _warps

__all__ = ["ROUTE_X_MAX_TOKENS", "route", "route_x"]

_MAX_EXPERTS = 1024  # all experts of a token in one block
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@triton.jit
def _route_kernel(
    logits_ptr, logits_st,  # [T, E]
    bias_ptr,  # [E] (HAS_BIAS)
    ids_ptr, weights_ptr,  # contiguous [T, TOP_K]: int32, fp32
    n_group, group_size, scaling,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_METHOD: tl.constexpr, NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    _route_row(logits_ptr + t * logits_st, t, bias_ptr, ids_ptr, weights_ptr, n_group, group_size, scaling,
               TOP_K, TOPK_GROUP, BLOCK_G, BLOCK_S, BLOCK_K, SOFTMAX, HAS_BIAS, GROUP_METHOD, NORM)


@triton.jit
def _logits_route_kernel(
    x_ptr, x_st, w_ptr, H, E,  # x [T, H] (a float dtype), router weight fp32 [E, H] contiguous
    logits_ptr, cnt_ptr,  # scratch fp32 [T, E]; arrival counters [T]
    bias_ptr, ids_ptr, weights_ptr, n_group, group_size, scaling,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_METHOD: tl.constexpr, NORM: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (T, expert blocks): BLOCK_E experts' fp32 logits of token t; the last block of the
    token to arrive routes it from the stored row."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        xv = tl.load(x_ptr + t * x_st + h, mask=h < H, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e[:, None].to(tl.int64) * H + h[None, :], mask=(e[:, None] < E) & (h[None, :] < H),
                     other=0.0)
        acc += wv * xv[None, :]
    tl.store(logits_ptr + t * E + e, tl.sum(acc, axis=1), mask=e < E)
    if arrive(cnt_ptr + t, tl.num_programs(1)):
        _route_row(logits_ptr + t * E, t, bias_ptr, ids_ptr, weights_ptr, n_group, group_size, scaling,
                   TOP_K, TOPK_GROUP, BLOCK_G, BLOCK_S, BLOCK_K, SOFTMAX, HAS_BIAS, GROUP_METHOD, NORM)


@triton.jit
def _route_row(
    row_ptr, t, bias_ptr, ids_ptr, weights_ptr, n_group, group_size, scaling,
    TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_METHOD: tl.constexpr, NORM: tl.constexpr,
):
    """Token t's routing from its logits row (read through L2: another program may have written it).
    GROUP_METHOD: 0 greedy (n_group == 1), 1 group_limited_greedy, 2 noaux_tc."""
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_S)[None, :]
    expert = g[:, None] * group_size + j  # [BLOCK_G, BLOCK_S]; padding cells are masked by `valid`
    valid = (g[:, None] < n_group) & (j < group_size)
    neg_inf = float("-inf")
    x = tl.load(row_ptr + expert, mask=valid, other=0.0, cache_modifier=".cg").to(tl.float32)
    if SOFTMAX:
        x = tl.where(valid, x, neg_inf)
        p = tl.exp(x - tl.max(tl.max(x, 1), 0))
        scores = p / tl.sum(tl.sum(p, 1), 0)
    else:
        scores = tl.sigmoid(x)
    scores = tl.where(valid, scores, 0.0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, neg_inf)

    if GROUP_METHOD != 0:
        best = tl.max(choice, 1)  # [BLOCK_G]
        if GROUP_METHOD == 2:  # noaux_tc: sum of a group's two best choices (one if the group has one)
            first = tl.min(tl.where(choice == best[:, None], j, BLOCK_S), 1)
            second = tl.max(tl.where(j == first[:, None], neg_inf, choice), 1)
            group_score = tl.where(group_size >= 2, best + second, best)
        else:  # group_limited_greedy: a group's best choice
            group_score = best
        group_score = tl.where(g < n_group, group_score, neg_inf)
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_score, 0)
            pick = tl.min(tl.where(group_score == top, g, BLOCK_G), 0)
            keep = keep | (g == pick)
            group_score = tl.where(g == pick, neg_inf, group_score)
        # The reference's fill: 0 for group_limited_greedy, -inf for noaux_tc.
        fill = 0.0 if GROUP_METHOD == 1 else neg_inf
        choice = tl.where(keep[:, None], choice, fill)
        choice = tl.where(valid, choice, neg_inf)

    k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int32)
    weights = tl.zeros([BLOCK_K], tl.float32)
    beyond = n_group * group_size  # past every expert id
    for r in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, 1), 0)
        pick = tl.min(tl.min(tl.where(valid & (choice == top), expert, beyond), 1), 0)
        hit = valid & (expert == pick)
        ids = tl.where(k == r, pick, ids)
        weights = tl.where(k == r, tl.sum(tl.sum(tl.where(hit, scores, 0.0), 1), 0), weights)
        choice = tl.where(hit, neg_inf, choice)
    if NORM:
        weights = weights / (tl.sum(weights, 0) + 1e-20)  # entries past TOP_K are 0
    weights = weights * scaling
    kmask = k < TOP_K
    tl.store(ids_ptr + t * TOP_K + k, ids, mask=kmask)
    tl.store(weights_ptr + t * TOP_K + k, weights, mask=kmask)


def route(
    logits: torch.Tensor,
    *,
    top_k: int,
    scoring: str,
    topk_method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.route in one launch: logits [T, E] (E <= 1024) -> ids int32 [T, top_k] (best
    first), weights fp32 [T, top_k]. Raises ValueError for what it does not support (the caller
    can fall back to the reference)."""
    _check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got {tuple(logits.shape)}")
    n_tok, n_exp = logits.shape
    meta, groups = _route_meta(n_exp, top_k, scoring, topk_method, n_group, topk_group, norm_topk_prob,
                               correction_bias)
    _check_device(logits, *([correction_bias] if correction_bias is not None else []))
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    ids, weights = _outputs(n_tok, top_k, logits.device)
    if n_tok:
        with _on(logits):
            _route_kernel[(n_tok,)](
                logits, logits.stride(0), _bias(correction_bias, logits), ids, weights, groups, n_exp // groups,
                float(routed_scaling_factor), **meta, num_warps=_warps(meta["BLOCK_G"] * meta["BLOCK_S"]),
            )  # fmt: skip
    return ids, weights


_ROUTE_ARGS = inspect.signature(route)  # route_x takes route()'s keyword arguments


def route_x(x: torch.Tensor, weight: torch.Tensor, **how) -> tuple[torch.Tensor, torch.Tensor]:
    """route(x @ weight^T in fp32, **how) in one launch for decode steps (each token's logits in
    expert blocks; the last block to arrive routes the token): x [T, H] (a float dtype), weight
    fp32 [E, H], `how` route()'s keyword arguments. Every token re-reads the weight: for a few
    tokens (ROUTE_X_MAX_TOKENS)."""
    bound = _ROUTE_ARGS.bind(None, **how)  # route()'s defaults; a wrong name raises TypeError
    bound.apply_defaults()
    how = bound.arguments
    top_k, correction_bias, routed_scaling_factor = how["top_k"], how["correction_bias"], how["routed_scaling_factor"]
    _check_float("x", x)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.dtype != torch.float32:
        raise ValueError(f"route_x takes x [T, H] and an fp32 weight [E, H], got {tuple(x.shape)} and "
                         f"{weight.dtype} {tuple(weight.shape)}")
    (n_tok, hidden), n_exp = x.shape, weight.shape[0]
    meta, groups = _route_meta(n_exp, top_k, how["scoring"], how["topk_method"], how["n_group"],
                               how["topk_group"], how["norm_topk_prob"], correction_bias)
    _check_device(x, weight, *([correction_bias] if correction_bias is not None else []))
    x, weight = (x if x.stride(1) == 1 else x.contiguous()), weight.contiguous()
    ids, weights = _outputs(n_tok, top_k, x.device)
    if n_tok:
        logits = torch.empty(n_tok, n_exp, dtype=torch.float32, device=x.device)
        block_e = max(1, triton.next_power_of_2(n_exp) // _ROUTE_X_PROGRAMS)
        with _on(x):
            _logits_route_kernel[(n_tok, triton.cdiv(n_exp, block_e))](
                x, x.stride(0), weight, hidden, n_exp, logits, counters("route_x", x.device, n_tok),
                _bias(correction_bias, logits), ids, weights, groups, n_exp // groups, float(routed_scaling_factor),
                **meta, BLOCK_E=block_e, BLOCK_H=_ROUTE_X_BLOCK_H, num_warps=4,
            )  # fmt: skip
    return ids, weights


ROUTE_X_MAX_TOKENS = 4  # route_x's tokens each read the whole router weight; more go through a GEMM
# Programs a token (its experts in blocks of one or more) and the H read per step: enough programs to read
# the weight in parallel, each in few long steps. Graph-replayed on an H100 (session 19, us a call,
# 64 programs x >= 2 experts x 1024 -> this): V2-Lite 6.7 -> 5.7, V3 20.5 -> 13.7 (the GEMV + route
# kernel pair: 8.5 / 13.5), Qwen3-30B-A3B 7.4 -> 7.0. (Session 18: 8 experts a program, 17 us.)
_ROUTE_X_PROGRAMS = 128
_ROUTE_X_BLOCK_H = 2048


def _route_meta(n_exp, top_k, scoring, topk_method, n_group, topk_group, norm_topk_prob,
                correction_bias) -> tuple[dict, int]:
    """The kernels' constexprs for a routing config and its groups (1 for greedy), after checking
    it (ValueError: not supported)."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if topk_method not in _TOPK_METHODS:
        raise ValueError(f"topk_method must be one of {', '.join(_TOPK_METHODS)}, got {topk_method!r}")
    if not 0 < n_exp <= _MAX_EXPERTS:
        raise ValueError(f"route takes 1..{_MAX_EXPERTS} experts, got {n_exp}")
    if not 1 <= top_k <= n_exp:
        raise ValueError(f"top_k must be in 1..{n_exp}, got {top_k}")
    grouped = topk_method != "greedy" and n_group > 1
    if not grouped:
        n_group, topk_group = 1, 1
    elif n_exp % n_group or not 1 <= topk_group <= n_group or top_k > topk_group * (n_exp // n_group):
        # The last case would pick masked experts, whose order the reference leaves to torch.topk.
        raise ValueError(
            f"expert groups do not fit: {n_exp} experts, n_group={n_group}, topk_group={topk_group}, top_k={top_k}"
        )
    if correction_bias is not None:
        _check_float("correction_bias", correction_bias)
        if correction_bias.shape != (n_exp,):
            raise ValueError(f"correction_bias must be [{n_exp}], got {tuple(correction_bias.shape)}")
    return dict(
        TOP_K=top_k, TOPK_GROUP=topk_group, BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_S=triton.next_power_of_2(n_exp // n_group), BLOCK_K=triton.next_power_of_2(top_k),
        SOFTMAX=scoring == "softmax", HAS_BIAS=correction_bias is not None,
        GROUP_METHOD=_TOPK_METHODS.index(topk_method) if grouped else 0, NORM=bool(norm_topk_prob),
    ), n_group


def _outputs(n_tok: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(n_tok, top_k, dtype=torch.int32, device=device),
            torch.empty(n_tok, top_k, dtype=torch.float32, device=device))


def _bias(correction_bias: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    return correction_bias.contiguous() if correction_bias is not None else other  # never read without HAS_BIAS
