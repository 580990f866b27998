"""The rooflines of ../shared/TARGETS.md, from a model's routed-expert shape and the measured machine.

Expert bytes are counted from the file's real tensor types (a Q4_K_M file mixes Q4_K, Q5_0, Q6_K,
Q8_0), read from the GGUF header alone. With E experts, top-k, MoE layers L and B bytes per expert
(one layer's gate + up + down, averaged over layers):

    decode roofline      tok/s = bw / (L * k * B)                      (one token reads k experts)
    distinct(E, k, U)    = E * (1 - (1 - k/E)^U)                       (experts U tokens touch)
    U-user bound         tok/s = U * bw / (L * distinct(E, k, U) * B)
    CPU prefill, T tok   t_cpu = max(distinct(T) * B / bw, 2*T*k*3*H*I / peak)   per layer
    GPU streaming        t_gpu = E * B / h2d                            per layer, whatever T
    dual-path            t = 1 / (1/t_cpu + 1/t_gpu)  (experts split so both finish together,
                         with the rates measured while both run)    tok/s = T / (L * t)

Each is what no engine can beat on this machine: attention, dense layers and the head are not
counted, so real engines land below. Pure arithmetic: unit-tested against hand-computed values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tandem.errors import TandemError

GB = 1e9
INT_FORMATS = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "INT8", "INT4")


@dataclass(frozen=True)
class ExpertShape:
    """What the bounds need of a model's routed experts."""

    moe_layers: int
    experts: int
    top_k: int
    hidden: int
    inter: int
    expert_bytes: float  # one expert's gate + up + down bytes, averaged over the MoE layers
    formats: tuple[str, ...] = ()

    def __post_init__(self):
        if self.moe_layers < 1 or self.experts < 1 or not 0 < self.top_k <= self.experts:
            raise TandemError(f"not a MoE model with routed experts: {self}")

    @property
    def bytes_per_token(self) -> float:
        """Routed-expert bytes one decode token reads."""
        return self.moe_layers * self.top_k * self.expert_bytes

    @property
    def layer_bytes(self) -> float:
        return self.experts * self.expert_bytes

    def flops_per_token_layer(self) -> float:
        return 2.0 * self.top_k * 3 * self.hidden * self.inter

    def integer_weights(self) -> bool:
        return bool(self.formats) and all(f in INT_FORMATS for f in self.formats)

    def with_moe_layers(self, n: int) -> ExpertShape:
        return ExpertShape(n, self.experts, self.top_k, self.hidden, self.inter, self.expert_bytes, self.formats)

    def as_dict(self) -> dict:
        return asdict(self) | {"bytes_per_token": self.bytes_per_token}


def expert_shape_from_gguf(ckpt, top_k: int) -> ExpertShape:
    """From a GGUFCheckpoint's headers: every layer holding ffn_{gate,up,down}_exps."""
    layers: dict[str, int] = {}
    formats, dims = set(), None
    for name in ckpt.names():
        if name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")):
            layer = name.split(".")[1]
            layers[layer] = layers.get(layer, 0) + ckpt.nbytes(name)
            formats.add(ckpt.qtype(name))
            if name.endswith("ffn_gate_exps.weight"):
                dims = ckpt.shape(name)  # (E, I, H)
    if not layers or dims is None:
        raise TandemError(f"{ckpt.model_dir} has no merged routed-expert tensors (ffn_*_exps): nothing to bound")
    experts, inter, hidden = dims
    per_expert = sum(layers.values()) / len(layers) / experts
    return ExpertShape(len(layers), experts, top_k, hidden, inter, per_expert, tuple(sorted(formats)))


def distinct_experts(experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts `tokens` uniformly routed tokens touch in one layer."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def decode_roofline(shape: ExpertShape, bw_gbs: float) -> float:
    """Single-stream decode tok/s if the routed experts were read at `bw_gbs`, nothing else."""
    return bw_gbs * GB / shape.bytes_per_token


def users_bound(shape: ExpertShape, bw_gbs: float, users: int) -> float:
    """Aggregate decode tok/s of `users` streams: each step reads the distinct experts they touch."""
    step_bytes = shape.moe_layers * distinct_experts(shape.experts, shape.top_k, users) * shape.expert_bytes
    return users * bw_gbs * GB / step_bytes


def cpu_seconds(nbytes: float, flops: float, bw_gbs: float, peak_flops: float | None) -> float:
    """Experts on the CPU: reading their bytes, or their FLOPs at the matrix units' peak."""
    return max(nbytes / (bw_gbs * GB), flops / peak_flops if peak_flops else 0.0)


def cpu_layer_seconds(shape: ExpertShape, tokens: int, bw_gbs: float, peak_flops: float | None) -> float:
    """One MoE layer's experts on the CPU: reading the touched experts, or the matrix units' peak."""
    return cpu_seconds(distinct_experts(shape.experts, shape.top_k, tokens) * shape.expert_bytes,
                       tokens * shape.flops_per_token_layer(), bw_gbs, peak_flops)


def prefill_bound(shape: ExpertShape, tokens: int, cpu_bw_gbs: float, peak_flops: float | None,
                  h2d_gbs: float | None = None) -> float:
    """Prefill tok/s bound: CPU alone, or (with h2d_gbs) the dual path of TARGETS.md.

    Pass the CPU and H2D rates measured while both run for the dual path."""
    t_cpu = cpu_layer_seconds(shape, tokens, cpu_bw_gbs, peak_flops)
    t = t_cpu
    if h2d_gbs:
        t_gpu = shape.layer_bytes / (h2d_gbs * GB)
        t = 1.0 / (1.0 / t_cpu + 1.0 / t_gpu)
    return tokens / (shape.moe_layers * t)


def compute_peak(shape: ExpertShape, amx_int8_tops: float | None, amx_bf16_tflops: float | None) -> tuple[float | None, str]:
    """(FLOP/s, label): INT8 tiles for integer-quantized experts, BF16 tiles for float ones."""
    if shape.integer_weights() and amx_int8_tops:
        return amx_int8_tops * 1e12, "AMX INT8"
    if amx_bf16_tflops:
        return amx_bf16_tflops * 1e12, "AMX BF16"
    return None, "bandwidth only"


def all_bounds(shape: ExpertShape, machine, prompts: list[int], users: int = 16) -> dict:
    """Every bound for this shape on this machine (a Machine from bench.machine)."""
    peak, peak_label = compute_peak(shape, machine.amx_int8_tops, machine.amx_bf16_tflops)
    out = {
        "decode_roofline_tok_s": decode_roofline(shape, machine.dram_read_gbs),
        "users": users,
        "users_bound_tok_s": users_bound(shape, machine.dram_read_gbs, users),
        "compute_peak": peak_label,
        "prefill_cpu_bound_tok_s": {p: prefill_bound(shape, p, machine.dram_read_gbs, peak) for p in prompts},
    }
    if machine.both_h2d_gbs:
        out["prefill_dual_bound_tok_s"] = {
            p: prefill_bound(shape, p, machine.both_cpu_gbs, peak, machine.both_h2d_gbs) for p in prompts
        }
    return out
