"""DeepSeek-V2 / V2-Lite / V3 / R1: MLA attention, MoE with shared experts, leading dense layers.

Routing by config: V2 softmax scoring with 'greedy' or 'group_limited_greedy'; V3/R1 sigmoid
scoring with e_score_correction_bias and 'noaux_tc' grouped top-k; routed_scaling_factor scales
the routed sum. Checkpoint names are HF hub names (one tensor per expert) or llama.cpp GGUF names
(`deepseek2` architecture, merged [E, ...] expert tensors); GGUF metadata maps onto the same config.
llama.cpp permutes no DeepSeek tensor: its `deepseek2` rope rotates adjacent pairs, as HF's does.
"""

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from tandem.errors import TandemError
from tandem.layers.attention import MLAConfig, MLAttention
from tandem.layers.linear import MLP
from tandem.layers.moe import MoE, MoEConfig
from tandem.layers.rope import RopeConfig
from tandem.models.common import (
    check_fields,
    CausalLM,
    DecoderLayer,
    Renamer,
    config_from_dict,
    rope_scaling_items,
    rope_theta,
)
from tandem.models.gguf_meta import (
    GGUF_BLOCK,
    GGUFKeys,
    gguf_decoder_rules,
    gguf_ffn_rules,
    tied_embeddings,
)

GGUF_SCORING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func values


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
    num_nextn_predict_layers: int = 0  # V3/R1 multi-token-prediction layers, stored after the last layer
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        check_fields(self)
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

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names: Collection[str] = ()) -> "DeepseekConfig":
        """From the `deepseek2.*` keys llama.cpp's convert_hf_to_gguf.py writes (old and new layouts)."""
        g = GGUFKeys(metadata)
        rope_dim = g.integer("rope.dimension_count")
        if "attention.key_length_mla" in g:
            # Newer converters describe MLA as MQA (key_length = kv_lora_rank + rope dim) and keep
            # the per-head sizes in the *_mla keys.
            qk_head, v_head = g.integer("attention.key_length_mla"), g.integer("attention.value_length_mla")
        else:
            qk_head, v_head = g.integer("attention.key_length"), g.integer("attention.value_length")
        gating = g.integer("expert_gating_func", 1)  # absent in DeepSeek-V2 files: softmax, as llama.cpp assumes
        if gating not in GGUF_SCORING:
            raise TandemError(f"GGUF expert_gating_func {gating} is not supported; tandem supports 1 (softmax), 2 (sigmoid)")
        scoring = GGUF_SCORING[gating]
        n_group, topk_group = g.integer("expert_group_count", 1), g.integer("expert_group_used_count", 1)
        if scoring == "sigmoid":  # V3/R1: bias-corrected choice (exp_probs_b) over groups
            topk_method = "noaux_tc"
        else:
            topk_method = "group_limited_greedy" if 1 < n_group and topk_group < n_group else "greedy"
        values = dict(
            vocab_size=g.vocab_size(),
            hidden_size=g.integer("embedding_length"),
            intermediate_size=g.integer("feed_forward_length"),
            moe_intermediate_size=g.integer("expert_feed_forward_length"),
            num_hidden_layers=g.integer("block_count"),
            num_attention_heads=g.integer("attention.head_count"),
            q_lora_rank=g.integer("attention.q_lora_rank", 0) or None,
            kv_lora_rank=g.integer("attention.kv_lora_rank"),
            qk_nope_head_dim=qk_head - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=v_head,
            n_routed_experts=g.integer("expert_count"),
            num_experts_per_tok=g.integer("expert_used_count"),
            n_shared_experts=g.integer("expert_shared_count", 0),
            routed_scaling_factor=g.number("expert_weights_scale", 1.0),
            scoring_func=scoring,
            topk_method=topk_method,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=g.flag("expert_weights_norm", False),
            first_k_dense_replace=g.integer("leading_dense_block_count", 0),
            rms_norm_eps=g.number("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=g.number("rope.freq_base", 10000.0),
            rope_scaling=_gguf_rope_scaling(g),
            max_position_embeddings=g.integer("context_length", 4096),
            tie_word_embeddings=tied_embeddings(tensor_names),
        )
        return config_from_dict(cls, values)

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


def _gguf_rope_scaling(g: GGUFKeys) -> tuple:
    kind = g.get("rope.scaling.type", "none")
    if kind == "none":
        return ()
    if kind != "yarn":
        raise TandemError(f"GGUF rope scaling {kind!r} is not supported for DeepSeek; tandem supports yarn")
    items = {
        "type": "yarn",
        "factor": g.number("rope.scaling.factor"),
        "original_max_position_embeddings": g.integer("rope.scaling.original_context_length"),
    }
    for key, name in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if f"rope.scaling.{name}" in g:
            items[key] = g.number(f"rope.scaling.{name}")
    log_mul = g.number("rope.scaling.yarn_log_multiplier", 0.0)
    if log_mul:
        # The converter writes 0.1 * mscale_all_dim, and llama.cpp takes mscale == mscale_all_dim
        # (true of every released DeepSeek config): cos/sin unscaled, softmax sharpened by mscale^2.
        mscale = round(log_mul * 10, 12)
        items.update(mscale=mscale, mscale_all_dim=mscale)
    else:
        items["attention_factor"] = 1.0  # llama.cpp's yarn with no log multiplier leaves cos/sin unscaled
    return tuple(sorted(items.items()))


def _join_kv_b(parts: list[torch.Tensor]) -> torch.Tensor:
    k_b, v_b = parts  # [nh, c, dn] (stored transposed), [nh, dv, c]
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).flatten(0, 1)  # [nh * (dn + dv), c]


class DeepseekForCausalLM(CausalLM):
    config_class = DeepseekConfig
    # Split kv_b halves left over in files that also hold attn_kv_b (never both are loaded).
    gguf_ignore = (r"blk\.\d+\.attn_[kv]_b\.weight",)

    @property
    def ignore(self) -> tuple[str, ...]:
        # Multi-token-prediction layers follow the last layer; tandem does not run them (yet).
        n, k = self.cfg.num_hidden_layers, self.cfg.num_nextn_predict_layers
        mtp = tuple(rf"model\.layers\.{i}\..*" for i in range(n, n + k))
        return (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",) + mtp

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

    def gguf_renamer(self) -> Renamer:
        """llama.cpp GGUF names (gguf-py's deepseek2 tensor table) -> ours."""
        blk, attn = GGUF_BLOCK, "layers.{layer}.attn."
        return Renamer(
            gguf_decoder_rules()
            + [
                (blk + r"attn_q\.weight", attn + "q_proj.weight"),
                (blk + r"attn_q_a\.weight", attn + "q_a_proj.weight"),
                (blk + r"attn_q_a_norm\.weight", attn + "q_a_layernorm.weight"),
                (blk + r"attn_q_b\.weight", attn + "q_b_proj.weight"),
                (blk + r"attn_kv_a_mqa\.weight", attn + "kv_a_proj_with_mqa.weight"),
                (blk + r"attn_kv_a_norm\.weight", attn + "kv_a_layernorm.weight"),
                (blk + r"attn_kv_b\.weight", attn + "kv_b_proj.weight"),
                (blk + r"attn_output\.weight", attn + "o_proj.weight"),
                (blk + r"exp_probs_b\.bias", "layers.{layer}.ffn.router.correction_bias"),
            ]
            + gguf_ffn_rules(),
            keep_layer=lambda i: i < self.cfg.num_hidden_layers,
        )

    @staticmethod
    def gguf_derived(shapes: Mapping[str, tuple[int, ...]]) -> dict:
        """attn_kv_b rebuilt from the attn_k_b + attn_v_b pair newer llama.cpp converters write.

        The converter views kv_b [nh*(dn+dv), c] as [nh, dn+dv, c], splits it into k_b [nh, dn, c]
        and v_b [nh, dv, c], and stores k_b transposed ([nh, c, dn] in torch order) for its
        absorbed attention. Returns {name: (sources, shape, combine)} for weights.DerivedCheckpoint.
        """
        derived = {}
        for name, k_shape in shapes.items():
            m = re.fullmatch(r"blk\.(\d+)\.attn_k_b\.weight", name)
            v_name, kv_name = (f"blk.{m[1]}.attn_v_b.weight", f"blk.{m[1]}.attn_kv_b.weight") if m else ("", "")
            if m is None or kv_name in shapes or v_name not in shapes:
                continue
            v_shape = shapes[v_name]
            if len(k_shape) != 3 or len(v_shape) != 3 or k_shape[0] != v_shape[0] or k_shape[1] != v_shape[2]:
                raise TandemError(
                    f"'{name}' {k_shape} and '{v_name}' {v_shape} do not fit together as DeepSeek's split kv_b "
                    "([heads, kv_lora_rank, nope dim] and [heads, v dim, kv_lora_rank]) — the file is damaged"
                )
            heads, rank, nope = k_shape
            derived[kv_name] = ((name, v_name), (heads * (nope + v_shape[1]), rank), _join_kv_b)
        return derived
