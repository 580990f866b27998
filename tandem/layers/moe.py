"""The one Mixture-of-Experts block for every MoE architecture.

Data path: router logits (fp32) -> route (top-k ids, weights) -> experts.submit(x, ids, w)
-> shared experts meanwhile -> experts.wait(handle, add=shared) -> routed + shared (the CPU
experts' stream path reads its result and adds in one kernel). `experts` is a backend bound to
this layer when the model is placed (plain torch here; layers/cpu_experts.py, block_experts.py,
dual_experts.py and hot_experts.py hold the others); models never subclass this block, they only
fill MoEConfig.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.errors import TandemError
from tandem.layers.linear import MLP, Linear
from tandem.layers.norm import fused_path
from tandem.ops import reference as ops

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # 'softmax' | 'sigmoid'
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    shared_intermediate_size: int = 0  # 0: no shared experts
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert output

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise TandemError(f"unsupported MoE scoring {self.scoring!r}; supported: softmax, sigmoid")
        if self.topk_method not in TOPK_METHODS:
            raise TandemError(f"unsupported MoE topk_method {self.topk_method!r}; supported: {', '.join(TOPK_METHODS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise TandemError(f"experts per token ({self.top_k}) must be in 1..{self.num_experts}")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise TandemError(
                f"expert groups do not fit: {self.num_experts} experts, n_group={self.n_group}, topk_group={self.topk_group}"
            )


class Router(nn.Module):
    KEEP_FP32 = True  # the loader keeps router weights and bias in fp32

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.correction_bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.correction_bias else None
        self._fused = True  # False once the fused routing kernel refused this config (checked before a launch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        how = dict(
            top_k=c.top_k,
            scoring=c.scoring,
            topk_method=c.topk_method,
            n_group=c.n_group,
            topk_group=c.topk_group,
            norm_topk_prob=c.norm_topk_prob,
            routed_scaling_factor=c.routed_scaling_factor,
            correction_bias=self.correction_bias,
        )
        if self._fused and fused_path(x):
            from tandem.ops.triton import route  # triton: imported on first use

            try:
                if x.shape[0] <= route.ROUTE_X_MAX_TOKENS and self.weight.dtype == torch.float32:
                    return route.route_x(x, self.weight, **how)  # one kernel: the logits too
                return route.route(self._logits(x), **how)  # scores, groups, top-k, weights
            except ValueError:  # a config the kernel does not take: the reference from now on
                self._fused = False
        return ops.route(self._logits(x), **how)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())  # [T, E]: routing always in fp32


class TorchExperts(nn.Module):
    """Routed experts computed with plain torch on the weights' device; stacked [E, ...] weights."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
        self.w_gate = nn.Parameter(torch.empty(e, i, h))
        self.w_up = nn.Parameter(torch.empty(e, i, h))
        self.w_down = nn.Parameter(torch.empty(e, h, i))

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Synchronous backend: the "handle" is the finished result.
        return ops.moe_experts(x, ids, weights, self.w_gate, self.w_up, self.w_down)

    def wait(self, handle: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return handle if add is None else handle + add


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = TorchExperts(cfg)
        self.shared = MLP(cfg.hidden_size, cfg.shared_intermediate_size) if cfg.shared_intermediate_size else None
        self.shared_gate = Linear(cfg.hidden_size, 1) if cfg.shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.router(x)
        out = None
        # A backend whose submit waits on the host for the routing (dual_experts' long steps) may
        # queue that wait's copy first (prepare): the shared experts then keep the device busy
        # through the wait. Otherwise they follow submit, overlapping an asynchronous backend.
        prepare = getattr(self.experts, "prepare", None)
        if self.shared is not None and prepare is not None and prepare(x, ids):
            out = self._shared(x)
        handle = self.experts.submit(x, ids, weights)
        if self.shared is not None and out is None:
            out = self._shared(x)
        return self.experts.wait(handle, add=out)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        return out if self.shared_gate is None else out * torch.sigmoid(self.shared_gate(x))
