"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): GQA attention,
softmax top-k routing, dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so.

Qwen2-MoE: q/k/v bias, one shared expert scaled by sigmoid(shared_expert_gate(x)), top-k weights
not renormalized by default. Qwen3-MoE: per-head RMSNorm on q and k, head_dim independent of
hidden_size, no shared expert, renormalized top-k. Checkpoint names are HF hub names (one tensor
per expert) or llama.cpp GGUF names (`qwen2moe` / `qwen3moe`, merged [E, ...] expert tensors;
llama.cpp permutes nothing: its rope for both rotates halves, as HF's does).
"""

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from tandem.errors import TandemError
from tandem.layers.attention import GQAConfig, GQAttention
from tandem.layers.linear import MLP
from tandem.layers.moe import MoE, MoEConfig
from tandem.layers.rope import RopeConfig
from tandem.models.common import (
    check_fields,
    check_int,
    LAYER,
    CausalLM,
    DecoderLayer,
    Renamer,
    config_from_dict,
    decoder_rules,
    hf_field,
    rope_scaling_items,
    rope_theta,
)
from tandem.models.gguf_meta import (
    GGUFKeys,
    gguf_decoder_rules,
    gguf_ffn_rules,
    gguf_gqa_rules,
    tied_embeddings,
)


@dataclass(frozen=True)
class QwenMoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # each routed expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE; 0: no shared expert
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # 'full_attention' | 'sliding_attention' per layer
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        check_fields(self)
        if self.hidden_act != "silu":
            raise TandemError(f"hidden_act {self.hidden_act!r} is not supported for Qwen-MoE (only silu)")
        if self.decoder_sparse_step < 1:
            raise TandemError(f"decoder_sparse_step must be at least 1, got {self.decoder_sparse_step}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise TandemError(f"layer_types lists {len(self.layer_types)} layers, num_hidden_layers is {self.num_hidden_layers}")
        if unknown := [t for t in self.layer_types if t not in ("full_attention", "sliding_attention")]:
            raise TandemError(f"layer_types holds {unknown[0]!r}: each layer is 'full_attention' or "
                              "'sliding_attention'")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.mlp_only_layers):
            raise TandemError(f"mlp_only_layers = {list(self.mlp_only_layers)!r} must list layer numbers "
                              "(integers >= 0)")
        if self.use_sliding_window and not self.sliding_window:
            raise TandemError("use_sliding_window is set but sliding_window is not: give the window in tokens")

    @classmethod
    def from_hf(cls, hf: dict) -> "QwenMoeConfig":
        qwen3 = hf.get("model_type") == "qwen3_moe" or "Qwen3MoeForCausalLM" in (hf.get("architectures") or [])
        # What is computed with below is checked first: per-layer tuples are built from the layer count.
        heads, layers, hidden = (hf_field(hf, k, int)
                                 for k in ("num_attention_heads", "num_hidden_layers", "hidden_size"))
        if not heads or not layers or not hidden:
            raise TandemError("config.json lacks hidden_size, num_attention_heads or num_hidden_layers for QwenMoeConfig")
        if qwen3:
            # Qwen3-MoE windows every layer when use_sliding_window is set; no bias but attention_bias.
            bias = hf_field(hf, "attention_bias", bool, False)
            overrides = dict(qkv_bias=bias, o_bias=bias, qk_norm=True, layer_types=("sliding_attention",) * layers)
        else:
            # transformers 5's default for Qwen2-MoE: even layers below max_window_layers slide.
            window_layers = hf_field(hf, "max_window_layers", int, 28)
            default = tuple("sliding_attention" if i % 2 == 0 and i < window_layers else "full_attention" for i in range(layers))
            layer_types = hf_field(hf, "layer_types", tuple) or default
            overrides = dict(qkv_bias=hf.get("qkv_bias", True), layer_types=layer_types)
        overrides.update(
            num_key_value_heads=hf_field(hf, "num_key_value_heads", int, heads),
            head_dim=hf_field(hf, "head_dim", int, hidden // heads),
            mlp_only_layers=hf_field(hf, "mlp_only_layers", tuple, ()),
            rope_scaling=rope_scaling_items(hf),
            rope_theta=rope_theta(hf),
        )
        return config_from_dict(cls, hf, **overrides)

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names: Collection[str] = ()) -> "QwenMoeConfig":
        """From the `qwen2moe.*` / `qwen3moe.*` keys of llama.cpp's converter, and the tensors present:
        llama.cpp takes biases, q/k norms, the shared expert and which layers are MoE from the tensors
        (no sliding window: llama.cpp applies none to these architectures)."""
        g, names = GGUFKeys(metadata), set(tensor_names)
        # checked before they size the per-layer lists and divide
        layers = check_int("num_hidden_layers", g.integer("block_count"))
        heads = check_int("num_attention_heads", g.integer("attention.head_count"))
        hidden = g.integer("embedding_length")
        shared = any(n.endswith("ffn_gate_inp_shexp.weight") for n in names)
        values = dict(
            vocab_size=g.vocab_size(),
            hidden_size=hidden,
            intermediate_size=g.integer("feed_forward_length", 0),
            moe_intermediate_size=g.integer("expert_feed_forward_length"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=g.integer("attention.head_count_kv", heads),
            head_dim=g.integer("attention.key_length", hidden // heads),
            num_experts=g.integer("expert_count"),
            num_experts_per_tok=g.integer("expert_used_count"),
            shared_expert_intermediate_size=g.integer("expert_shared_feed_forward_length") if shared else 0,
            # llama.cpp renormalizes the top-k weights for Qwen3-MoE and not for Qwen2-MoE
            norm_topk_prob=g.flag("expert_weights_norm", g.arch == "qwen3moe"),
            mlp_only_layers=tuple(i for i in range(layers) if names and f"blk.{i}.ffn_gate_inp.weight" not in names),
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            layer_types=("full_attention",) * layers,
            rms_norm_eps=g.number("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=g.number("rope.freq_base", 10000.0),
            max_position_embeddings=g.integer("context_length", 32768),
            tie_word_embeddings=tied_embeddings(names),
        )
        if g.get("rope.scaling.type", "none") == "yarn":
            values["rope_scaling"] = (
                ("factor", g.number("rope.scaling.factor")),
                ("original_max_position_embeddings", g.integer("rope.scaling.original_context_length")),
                ("rope_type", "yarn"),
            )
        elif g.get("rope.scaling.type", "none") != "none":
            raise TandemError(f"GGUF rope scaling {g.get('rope.scaling.type')!r} is not supported for Qwen-MoE")
        return config_from_dict(cls, values)

    # The runtime reads these names of every model config (see common.ModelConfig).
    @property
    def n_routed_experts(self) -> int:
        return self.num_experts

    @property
    def n_shared_experts(self) -> int:
        return 1 if self.shared_expert_intermediate_size else 0

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    def gqa(self, i: int) -> GQAConfig:
        slides = self.use_sliding_window and self.layer_types[i] == "sliding_attention"
        rope = RopeConfig(
            dim=self.head_dim,
            theta=self.rope_theta,
            scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
            interleaved=False,
        )
        return GQAConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope=rope,
            qkv_bias=self.qkv_bias,
            o_bias=self.o_bias,
            qk_norm=self.qk_norm,
            sliding_window=self.sliding_window if slides else None,
            norm_eps=self.rms_norm_eps,
        )

    def moe(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            top_k=self.num_experts_per_tok,
            scoring="softmax",
            topk_method="greedy",
            norm_topk_prob=self.norm_topk_prob,
            shared_intermediate_size=self.shared_expert_intermediate_size,
            shared_gate=self.shared_expert_intermediate_size > 0,
        )


class QwenMoeForCausalLM(CausalLM):
    config_class = QwenMoeConfig
    ignore = ()

    def __init__(self, cfg: QwenMoeConfig):
        super().__init__(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.tie_word_embeddings)
        self.cfg = cfg
        moe = cfg.moe() if cfg.num_experts else None
        for i in range(cfg.num_hidden_layers):
            ffn = MoE(moe) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
            self.layers.append(DecoderLayer(GQAttention(cfg.gqa(i), i), ffn, cfg.hidden_size, cfg.rms_norm_eps))

    def renamer(self) -> Renamer:
        mlp = LAYER + r"mlp\."
        return Renamer(
            decoder_rules()
            + [
                (mlp + r"gate\.weight", "layers.{layer}.ffn.router.weight"),
                (mlp + r"experts\.(?P<e>\d+)\.(?P<p>gate|up|down)_proj\.weight", "layers.{layer}.ffn.experts.w_{p}[{e}]"),
                (mlp + r"shared_expert\.(?P<p>gate_proj|up_proj|down_proj)\.weight", "layers.{layer}.ffn.shared.{p}.weight"),
                (mlp + r"shared_expert_gate\.weight", "layers.{layer}.ffn.shared_gate.weight"),
                (mlp + r"(?P<p>gate_proj|up_proj|down_proj)\.weight", "layers.{layer}.ffn.{p}.weight"),
            ],
            keep_layer=lambda i: True,  # no extra (MTP) layers: a stray layer is a config mismatch
        )

    def gguf_renamer(self) -> Renamer:
        """llama.cpp GGUF names (gguf-py's qwen2moe / qwen3moe tensor tables) -> ours."""
        return Renamer(gguf_decoder_rules() + gguf_gqa_rules() + gguf_ffn_rules(), keep_layer=lambda i: True)

    @staticmethod
    def gguf_derived(shapes: Mapping[str, tuple[int, ...]]) -> dict:
        """The shared-expert gate [1, H], should a file store it as a vector [H]."""
        return {
            name: ((name,), (1, shape[0]), lambda parts: parts[0].reshape(1, -1))
            for name, shape in shapes.items()
            if name.endswith("ffn_gate_inp_shexp.weight") and len(shape) == 1
        }
