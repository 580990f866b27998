"""Mixtral (8x7B, 8x22B): GQA attention with an optional sliding window on every layer, and a MoE
in every layer: softmax over the experts, top-k (2 of 8), the k weights renormalized to sum to 1.

Checkpoint names are HF hub names: `block_sparse_moe.gate` is the router and expert e holds
w1 (gate), w3 (up) and w2 (down). GGUF files (llama.cpp's `llama` architecture with experts) hold
merged [E, ...] expert tensors and q/k rows permuted for llama.cpp's adjacent-pair rope; the
model permutes them back (`gguf_derived`).
"""

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from tandem.errors import TandemError
from tandem.layers.attention import GQAConfig, GQAttention
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
class MixtralConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # each expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int | None = None  # a query sees itself and the window - 1 tokens before it
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: tuple = ()
    max_position_embeddings: int = 4096 * 32
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        check_fields(self)
        if self.hidden_act != "silu":
            raise TandemError(f"hidden_act {self.hidden_act!r} is not supported for Mixtral (only silu)")

    @classmethod
    def from_hf(cls, hf: dict) -> "MixtralConfig":
        heads, hidden = hf_field(hf, "num_attention_heads", int), hf_field(hf, "hidden_size", int)
        if not heads or not hidden:
            raise TandemError("config.json lacks hidden_size or num_attention_heads for MixtralConfig")
        return config_from_dict(
            cls,
            hf,
            num_key_value_heads=hf_field(hf, "num_key_value_heads", int, heads),
            head_dim=hf_field(hf, "head_dim", int, hidden // heads),
            rope_scaling=rope_scaling_items(hf),
            rope_theta=rope_theta(hf, default=1e6),
        )

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names: Collection[str] = ()) -> "MixtralConfig":
        """From the `llama.*` keys llama.cpp's converter writes for Mixtral (no sliding window: llama.cpp
        applies none)."""
        g = GGUFKeys(metadata)
        if not g.get("expert_count"):
            raise TandemError("this GGUF is a dense Llama-architecture model; tandem runs MoE models (Mixtral) only")
        heads = check_int("num_attention_heads", g.integer("attention.head_count"))  # before it divides
        hidden = g.integer("embedding_length")
        values = dict(
            vocab_size=g.vocab_size(),
            hidden_size=hidden,
            intermediate_size=g.integer("expert_feed_forward_length", 0) or g.integer("feed_forward_length"),
            num_hidden_layers=g.integer("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=g.integer("attention.head_count_kv", heads),
            head_dim=g.integer("attention.key_length", g.integer("rope.dimension_count", hidden // heads)),
            num_local_experts=g.integer("expert_count"),
            num_experts_per_tok=g.integer("expert_used_count"),
            rms_norm_eps=g.number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=g.number("rope.freq_base", 10000.0),
            max_position_embeddings=g.integer("context_length", 4096),
            tie_word_embeddings=tied_embeddings(tensor_names),
        )
        if g.get("rope.scaling.type", "none") != "none":
            raise TandemError(f"GGUF rope scaling {g.get('rope.scaling.type')!r} is not supported for Mixtral")
        return config_from_dict(cls, values)

    # The runtime reads these names of every model config (see common.ModelConfig).
    @property
    def n_routed_experts(self) -> int:
        return self.num_local_experts

    @property
    def n_shared_experts(self) -> int:
        return 0

    def is_moe_layer(self, i: int) -> bool:
        return True

    def gqa(self) -> GQAConfig:
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
            sliding_window=self.sliding_window,
            norm_eps=self.rms_norm_eps,
        )

    def moe(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_experts=self.num_local_experts,
            top_k=self.num_experts_per_tok,
            scoring="softmax",
            topk_method="greedy",
            norm_topk_prob=True,
        )


class MixtralForCausalLM(CausalLM):
    config_class = MixtralConfig
    ignore = ()

    def __init__(self, cfg: MixtralConfig):
        super().__init__(cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps, cfg.tie_word_embeddings)
        self.cfg = cfg
        gqa, moe = cfg.gqa(), cfg.moe()
        for i in range(cfg.num_hidden_layers):
            self.layers.append(DecoderLayer(GQAttention(gqa, i), MoE(moe), cfg.hidden_size, cfg.rms_norm_eps))

    def renamer(self) -> Renamer:
        moe = LAYER + r"block_sparse_moe\."
        expert = moe + r"experts\.(?P<e>\d+)\."
        return Renamer(
            decoder_rules()
            + [
                (moe + r"gate\.weight", "layers.{layer}.ffn.router.weight"),
                (expert + r"w1\.weight", "layers.{layer}.ffn.experts.w_gate[{e}]"),
                (expert + r"w3\.weight", "layers.{layer}.ffn.experts.w_up[{e}]"),
                (expert + r"w2\.weight", "layers.{layer}.ffn.experts.w_down[{e}]"),
            ],
            keep_layer=lambda i: True,  # no extra (MTP) layers: a stray layer is a config mismatch
        )

    def gguf_renamer(self) -> Renamer:
        """llama.cpp GGUF names (gguf-py's llama tensor table, experts merged or per expert) -> ours."""
        return Renamer(gguf_decoder_rules() + gguf_gqa_rules() + gguf_ffn_rules(), keep_layer=lambda i: True)

    def gguf_derived(self, shapes: Mapping[str, tuple[int, ...]]) -> dict:
        """q/k rows back in HF order: llama.cpp's converter permutes each head's rows from
        [first half | second half] (rotate-half rope) to interleaved pairs (its adjacent-pair rope)."""
        heads = {"attn_q": self.cfg.num_attention_heads, "attn_k": self.cfg.num_key_value_heads}
        derived = {}
        for name, shape in shapes.items():
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in heads:
                n = heads[parts[2]]
                derived[name] = ((name,), shape, lambda t, n=n: _unpermute(t[0], n))
        return derived


def _unpermute(t: torch.Tensor, heads: int) -> torch.Tensor:
    # Inverse of the converter's reshape(heads, 2, rows/heads/2, ...).swapaxes(1, 2).
    return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
