"""Shared pieces of the CPU expert engine tests: random weights and routings, GGUF blocks, and the
references (numpy quantizers that mirror csrc/quant, gguf's dequantizer, ops.reference's MoE)."""

import gguf
import numpy as np
import torch

from tandem.ops.reference import moe_experts

# Relative error (max |out - ref| / max |ref|) allowed when the engine and the reference use the
# same dequantized weights: only fp32 summation order differs (float32 out), plus the final
# rounding (bfloat16 out: 2^-9 relative).
TOL_F32 = 2e-5
TOL_BF16 = 8e-3

# fp16 scale fields of each GGUF block (byte offsets) and their magnitude, chosen so that weights
# come out ~1/sqrt(K): d * max(q) for Q8_0/Q5_0, d * 63 * 15 for Q4_K, etc.
GGUF_SCALES = {
    "Q8_0": {0: 127.0},
    "Q5_0": {0: 16.0},
    "Q4_K": {0: 63.0 * 15, 2: 63.0 * 8},
    "Q5_K": {0: 63.0 * 31, 2: 63.0 * 16},
    "Q6_K": {208: 128.0 * 32},
}


def dense_weights(E: int, I: int, H: int, seed: int = 0, dtype=torch.float32):
    """gate/up [E, I, H], down [E, H, I], scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, I, H, generator=g) / H**0.5
    up = torch.randn(E, I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    return gate.to(dtype), up.to(dtype), down.to(dtype)


def routing(T: int, E: int, k: int, kind: str = "random", seed: int = 0):
    """ids [T, k] int32 and w [T, k] float32.

    random: k distinct experts per token; one: every slot of every token -> one expert; padded:
    random with about a third of the slots -1; few: two experts only, repeats within a token.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        ids = torch.rand(T, E, generator=g).topk(min(k, E), dim=-1).indices
        if k > E:
            ids = torch.cat([ids, ids[:, : k - E]], dim=1)
    elif kind == "one":
        ids = torch.full((T, k), E - 1)
    elif kind == "padded":
        ids = torch.rand(T, E, generator=g).topk(min(k, E), dim=-1).indices
        ids[torch.rand(ids.shape, generator=g) < 0.35] = -1
    elif kind == "few":
        ids = torch.randint(0, 2, (T, k), generator=g) * (E // 2)
    else:
        raise ValueError(kind)
    w = torch.rand(T, k, generator=g) + 0.1
    return ids.to(torch.int32), w


def tokens(T: int, H: int, seed: int = 1, dtype=torch.float32):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference(x, ids, w, gate, up, down) -> torch.Tensor:
    """The MoE of ops.reference in float64 on the given (already dequantized) weights."""
    d = torch.float64
    return moe_experts(x.to(d), ids, w.to(d), gate.to(d), up.to(d), down.to(d))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (out.double() - ref.double()).abs().max().item() / max(scale, 1e-30)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: max error {err:.3g} of max |ref| exceeds {tol:g}"


# numpy mirrors of the online quantizers (csrc/quant/int8.h, int4.h): same float32 ops, same rint.


def int8_dequant_ref(w: torch.Tensor) -> torch.Tensor:
    a = w.float().numpy()
    scale = np.abs(a).max(-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale == 0, 0, np.rint(a / scale))
    q = np.clip(q, -127, 127).astype(np.float32)
    return torch.from_numpy(scale * q)


def int4_dequant_ref(w: torch.Tensor, group: int = 64) -> torch.Tensor:
    a = w.float().numpy()
    g = a.reshape(*a.shape[:-1], a.shape[-1] // group, group)
    d = np.abs(g).max(-1, keepdims=True) / np.float32(7)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d == 0, 0, np.rint(g / d))
    q = np.clip(q, -8, 7).astype(np.float32)
    return torch.from_numpy((d * q).reshape(a.shape))


def dequant_ref(fmt: str, w: torch.Tensor) -> torch.Tensor:
    """What the engine computes with for an online format's weights."""
    if fmt == "BF16":
        return w.to(torch.bfloat16).float()
    if fmt == "INT8":
        return int8_dequant_ref(w)
    if fmt == "INT4":
        return int4_dequant_ref(w)
    raise ValueError(fmt)


def gguf_blocks(fmt: str, E: int, rows: int, K: int, seed: int = 0):
    """Valid random GGUF blocks for an [E, rows, K] weight: random bytes, with the fp16 scale
    fields replaced by small finite values. Returns (raw uint8 [E, rows, row_bytes],
    gguf-dequantized float32 [E, rows, K])."""
    qtype = gguf.GGMLQuantizationType[fmt]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(E, rows, K // block_elems, block_bytes), dtype=np.uint8)
    for offset, qmax in GGUF_SCALES[fmt].items():
        mag = rng.uniform(0.5, 1.5, size=raw.shape[:-1]) / (qmax * K**0.5)
        sign = rng.choice([-1.0, 1.0], size=raw.shape[:-1]) if offset == 0 else 1.0
        raw[..., offset : offset + 2] = (mag * sign).astype(np.float16).view(np.uint8).reshape(*raw.shape[:-1], 2)
    raw = raw.reshape(E, rows, -1)
    deq = gguf.quants.dequantize(raw, qtype)
    return torch.from_numpy(raw), torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32))
