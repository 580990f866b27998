"""Rotary position embedding: frequencies (plain and YaRN) and per-token cos/sin."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from tandem.errors import TandemError
from tandem.layers.norm import fused_ops, fused_path
from tandem.ops import reference as ops


@dataclass(frozen=True)
class RopeConfig:
    dim: int  # rotated dims per head
    theta: float = 10000.0
    scaling: tuple[tuple[str, object], ...] = ()  # HF rope_scaling items, () = none
    max_position_embeddings: int = 4096
    interleaved: bool = True

    def __post_init__(self):
        kind = self.kind
        if kind not in ("default", "yarn"):
            raise TandemError(f"unsupported rope scaling type {kind!r}; tandem supports: default, yarn")
        if self.dim % 2:
            raise TandemError(f"rope dim must be even, got {self.dim}")
        if kind == "yarn":
            self._check_yarn()

    def _check_yarn(self) -> None:
        """YaRN's numbers in range (a factor of -1 or 0 gave negative or infinite frequencies)."""
        p = self.params
        for key, low in (("factor", 0.0), ("beta_fast", 0.0), ("beta_slow", 0.0), ("attention_factor", 0.0),
                         ("mscale", None), ("mscale_all_dim", None), ("original_max_position_embeddings", 1.0)):
            value = p.get(key)
            if value is None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (low is not None and (value <= low if low == 0.0 else value < low)):
                need = "a finite number" + ("" if low is None else " > 0" if low == 0.0 else f" >= {low:g}")
                raise TandemError(f"rope_scaling {key} = {value!r} must be {need}")

    @property
    def params(self) -> dict:
        return dict(self.scaling)

    @property
    def kind(self) -> str:
        p = self.params
        return p.get("rope_type", p.get("type", "default")) if p else "default"

    def softmax_scale_factor(self) -> float:
        """YaRN with mscale_all_dim also sharpens the attention softmax (DeepSeek's convention)."""
        p = self.params
        if self.kind == "yarn" and p.get("mscale_all_dim"):
            m = ops.yarn_mscale(float(p["factor"]), float(p["mscale_all_dim"]))
            return m * m
        return 1.0


def rope_frequencies(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """inv_freq [dim/2] and the factor that scales cos/sin."""
    base, dim = cfg.theta, cfg.dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if cfg.kind == "default":
        return inv_freq, 1.0
    p = cfg.params
    orig = int(p.get("original_max_position_embeddings", cfg.max_position_embeddings))
    factor = float(p.get("factor") or cfg.max_position_embeddings / orig)
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        # The dim whose wavelength completes `rotations` turns over the original context.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # Fast-rotating dims keep their frequency (extrapolate); slow ones are stretched by `factor`.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    scale = p.get("attention_factor")
    if scale is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            scale = ops.yarn_mscale(factor, float(p["mscale"])) / ops.yarn_mscale(factor, float(p["mscale_all_dim"]))
        else:
            scale = ops.yarn_mscale(factor)
    return inv_freq, float(scale)


class Rope(nn.Module):
    def __init__(self, cfg: RopeConfig):
        super().__init__()
        self.cfg = cfg
        # A plain attribute, not a buffer: computed on the CPU even when the model is built on the
        # meta device for loading, and moved to the positions' device on first use.
        self.inv_freq, self.cos_sin_scale = rope_frequencies(cfg)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, dim/2] in fp32 for absolute positions [T]."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.cos_sin_scale, angles.sin() * self.cos_sin_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if fused_path(x):  # one fused kernel instead of torch's handful
            return fused_ops().rope(x, cos, sin, self.cfg.interleaved)
        return ops.apply_rope(x, cos, sin, self.cfg.interleaved)
