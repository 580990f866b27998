"""Full-depth estimates from two truncations of one model (TARGETS.md's protocol).

Two files with the same dense lead layers and a different number of MoE layers (A > B): the time
of one more MoE layer is (t_A - t_B) / (moe_A - moe_B), and the full model takes
t_A + (moe_full - moe_A) * that. Why a difference and not t_A / layers_A: during prefill an
engine may compute only the output token in a model's LAST layer, so a truncation's last layer
is not a full layer; both truncations have exactly one such last layer, and so does the full
model, so it cancels in the difference and is carried, once, into the estimate. Embeddings, the
dense layers and the head are likewise counted once. The result is an ESTIMATE and says so.
"""

from __future__ import annotations

from tandem.bench.bounds import ExpertShape
from tandem.errors import TandemError


def per_layer(t_a: float, t_b: float, moe_a: int, moe_b: int) -> float:
    """Seconds one more MoE layer adds."""
    if moe_a == moe_b:
        raise TandemError("the two truncations have the same number of MoE layers: give two different depths")
    return (t_a - t_b) / (moe_a - moe_b)


def full_time(t_a: float, t_b: float, moe_a: int, moe_b: int, moe_full: int) -> float:
    return t_a + (moe_full - moe_a) * per_layer(t_a, t_b, moe_a, moe_b)


def check_pair(a: ExpertShape, b: ExpertShape, dense_a: int, dense_b: int) -> None:
    same = (a.experts, a.top_k, a.hidden, a.inter) == (b.experts, b.top_k, b.hidden, b.inter)
    if not same:
        raise TandemError("--extrapolate needs two truncations of ONE model; their expert shapes differ")
    if dense_a != dense_b:
        raise TandemError(
            f"the truncations have {dense_a} and {dense_b} dense lead layers: both must keep all of them "
            "(e.g. DeepSeek-V3 with --layers 4 and --layers 8)"
        )


def estimate(a: dict, b: dict, moe_a: int, moe_b: int, moe_full: int) -> dict:
    """Extrapolated measured figures (the `measured` dicts of the two runs) at full depth.

    Where the deeper truncation was not slower (noise larger than a layer's time), the figure is
    None and `notes` says why, rather than a meaningless number."""
    if moe_full < max(moe_a, moe_b):
        raise TandemError(f"the full model has {moe_full} MoE layers, fewer than a truncation's")
    out = {"ttft_s": {}, "prefill_tok_s": {}, "per_moe_layer_s": {}, "notes": []}

    def full(what: str, t_a: float, t_b: float) -> float | None:
        layer = per_layer(t_a, t_b, moe_a, moe_b)
        out["per_moe_layer_s"][what] = layer
        if layer <= 0:
            out["notes"].append(f"{what}: the deeper truncation was not slower (noise): use deeper "
                                "truncations or more repeats")
            return None
        return t_a + (moe_full - moe_a) * layer

    for p, t_a in a["ttft_s"].items():
        t = full(f"prefill_{p}", t_a, b["ttft_s"][p])
        out["ttft_s"][p] = t
        out["prefill_tok_s"][p] = int(p) / t if t else None
    step = full("decode_token", 1.0 / a["decode_tok_s"], 1.0 / b["decode_tok_s"])
    out["decode_tok_s"] = 1.0 / step if step else None
    if a.get("users_tok_s") and b.get("users_tok_s"):
        # U users make U tokens per step: 1 / rate is the step time / U, linear in the layers too
        step = full("users_token", 1 / a["users_tok_s"], 1 / b["users_tok_s"])
        out["users_tok_s"] = 1.0 / step if step else None
    return out
