"""DeepSeek-V2 / V2-Lite / V3 / R1: MLA attention, MoE with shared experts, leading dense layers.

Routing by config: V2 softmax scoring with 'greedy' or 'group_limited_greedy'; V3/R1 sigmoid
scoring with e_score_correction_bias and 'noaux_tc' grouped top-k; routed_scaling_factor scales
the routed sum. Checkpoint names are HF hub names (one tensor per expert).
"""

from dataclasses import dataclass

from tandem.errors import TandemError
from tandem.layers.attention import MLAConfig, MLAttention
from tandem.layers.linear import MLP
from tandem.layers.moe import MoE, MoEConfig
from tandem.layers.rope import RopeConfig
from tandem.models.common import CausalLM, DecoderLayer, Renamer, config_from_dict, rope_scaling_items, rope_theta


@dataclass(frozen=True)
class DeepseekConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    q_lora_rank: int | None = None
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise TandemError(f"hidden_act {self.hidden_act!r} is not supported for DeepSeek (only silu)")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise TandemError("topk_method 'noaux_tc' needs scoring_func 'sigmoid' (DeepSeek-V3 style)")

    @classmethod
    def from_hf(cls, hf: dict) -> "DeepseekConfig":
        overrides = {"rope_scaling": rope_scaling_items(hf), "rope_theta": rope_theta(hf)}
        if hf.get("model_type") == "deepseek_v3":
            # transformers' V3 always scores with sigmoid + noaux_tc; the hub config says so too
            overrides.update(scoring_func=hf.get("scoring_func") or "sigmoid", topk_method=hf.get("topk_method") or "noaux_tc")
        return config_from_dict(cls, hf, **overrides)

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def mla(self) -> MLAConfig:
        rope = RopeConfig(
            dim=self.qk_rope_head_dim,
            theta=self.rope_theta,
            scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
            interleaved=self.rope_interleave,
        )
        return MLAConfig(
            self.hidden_size,
            self.num_attention_heads,
            self.q_lora_rank,
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
            rope,
            self.attention_bias,
        )

    def moe(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_intermediate_size,
            num_experts=self.n_routed_experts,
            top_k=self.num_experts_per_tok,
            scoring=self.scoring_func,
            topk_method=self.topk_method,
            n_group=self.n_group or 1,
            topk_group=self.topk_group or 1,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            correction_bias=self.topk_method == "noaux_tc",
            shared_intermediate_size=self.moe_intermediate_size * self.n_shared_experts,
        )


class DeepseekForCausalLM(CausalLM):
    config_class = DeepseekConfig
    # Multi-token-prediction layers (index >= num_hidden_layers) are skipped by the renamer.
    ignore = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

    def __init__(self, cfg: DeepseekConfig):
        super().__init__(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.tie_word_embeddings)
        self.cfg = cfg
        mla, moe = cfg.mla(), cfg.moe()
        for i in range(cfg.num_hidden_layers):
            ffn = MoE(moe) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
            self.layers.append(DecoderLayer(MLAttention(mla, i), ffn, cfg.hidden_size, cfg.rms_norm_eps))

    def renamer(self) -> Renamer:
        layer = r"model\.layers\.(?P<layer>\d+)\."
        return Renamer(
            [
                (r"model\.embed_tokens\.weight", "embed.weight"),
                (r"model\.norm\.weight", "norm.weight"),
                (r"lm_head\.weight", "lm_head.weight"),
                (layer + r"input_layernorm\.weight", "layers.{layer}.attn_norm.weight"),
                (layer + r"post_attention_layernorm\.weight", "layers.{layer}.ffn_norm.weight"),
                (layer + r"self_attn\.(?P<p>\w+)\.(?P<t>weight|bias)", "layers.{layer}.attn.{p}.{t}"),
                (layer + r"mlp\.gate\.weight", "layers.{layer}.ffn.router.weight"),
                (layer + r"mlp\.gate\.e_score_correction_bias", "layers.{layer}.ffn.router.correction_bias"),
                (layer + r"mlp\.experts\.(?P<e>\d+)\.(?P<p>gate|up|down)_proj\.weight", "layers.{layer}.ffn.experts.w_{p}[{e}]"),
                (layer + r"mlp\.shared_experts\.(?P<p>\w+)\.weight", "layers.{layer}.ffn.shared.{p}.weight"),
                (layer + r"mlp\.(?P<p>gate_proj|up_proj|down_proj)\.weight", "layers.{layer}.ffn.{p}.weight"),
            ],
            keep_layer=lambda i: i < self.cfg.num_hidden_layers,
        )
