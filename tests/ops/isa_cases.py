"""What the ISA kernels compute, emulated in torch: the engine quantizes activations once per call
(csrc/kernels/act.h) and some prefill paths round weights to bf16 (AMX tiles). Replaying those
roundings on the generic kernels' weights gives a reference the ISA kernels must match to ~1e-3;
against the generic kernels themselves they differ by the activation quantization (stated bounds).
"""

import torch
import torch.nn.functional as F

from tandem.ops import cpu

# max |isa - generic| / max |generic| allowed, by the activation layout the format's kernels use:
# int8 activations (one scale per 32, 256 or K values) err ~0.5% per product, and the MoE chains
# three of them (gate/up, then down on h); bf16 activations ~0.2%; fp32 activations only reorder sums.
ISA_VS_GENERIC = {"F32": 1e-5, "BF16": 1.5e-2, "Q8_32": 5e-2, "Q8_K": 5e-2, "Q8_ROW": 6e-2, "Q8_64": 5e-2}
# max |isa - emulation| / max |emulation|: summation order, and an activation of h that rounds to the
# neighbouring int8 step when the engine's fp32 h and the float64 emulation straddle a boundary.
ISA_VS_EMULATION = 3e-3


def usable_isas() -> list[str]:
    """The ISA levels this build and CPU run, best last (not amx-emu: only tests name it)."""
    info = cpu.isa_info()
    return [i for i in ("avx2", "avx512", "amx") if i in info["cpu"] and i in info["built"]]


def quantize_acts(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows of float32 x [n, K] as the kernels see them after preparation (float64)."""
    x = x.float()
    K = x.shape[-1]
    if kind == "F32":
        return x.double()
    if kind == "BF16":
        return x.bfloat16().double()
    block = {"Q8_32": 32, "Q8_64": 64, "Q8_K": 256, "Q8_ROW": None}[kind]
    Kp = K if kind == "Q8_K" else -(-K // 64) * 64
    xp = F.pad(x, (0, Kp - K))
    blocks = xp.reshape(x.shape[0], -1, block or Kp)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0  # float32 ops, like the kernels
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv)  # half to even, as vcvtps2dq
    return (q.double() * d.double()).reshape(x.shape[0], Kp)[:, :K]


def emulate(engine, x, ids, w, held, fmts) -> torch.Tensor:
    """The engine's MoE on weights `held` (generic dequantization, float32) with the activation and
    weight roundings of the engine's kernels for each expert's token count."""
    info = engine.kernel_info()
    E = held[0].shape[0]
    T = ids.shape[0]
    counts = torch.bincount(ids[ids >= 0].long(), minlength=E)
    out = torch.zeros(T, held[2].shape[1], dtype=torch.float64)
    xf = x.float()
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        kinds, weights = [], []
        for m, f in enumerate(fmts):
            ki = info[f]
            big = "big_path" in ki and counts[e] >= ki["big_min"]
            kinds.append(ki["big_act"] if big else ki["act"])
            wm = held[m][e].float()
            if big and "dequantized" in ki["big_path"]:
                wm = wm.bfloat16()  # expanded to a bf16 panel for the tiles
            weights.append(wm.double())
        g = quantize_acts(xf[tok], kinds[0]) @ weights[0].T
        u = quantize_acts(xf[tok], kinds[1]) @ weights[1].T
        h = (F.silu(g) * u).float()
        y = quantize_acts(h, kinds[2]) @ weights[2].T
        out.index_add_(0, tok, y * w[tok, slot].double()[:, None])
    return out
