"""Architecture registry: HF `architectures` / `model_type`, or GGUF `general.architecture` -> model class."""

from tandem.errors import TandemError
from tandem.models.deepseek import DeepseekForCausalLM
from tandem.models.mixtral import MixtralForCausalLM
from tandem.models.qwen_moe import QwenMoeForCausalLM

ARCHITECTURES = {
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}
MODEL_TYPES = {
    "deepseek_v2": DeepseekForCausalLM,
    "deepseek_v3": DeepseekForCausalLM,
    "qwen2_moe": QwenMoeForCausalLM,
    "qwen3_moe": QwenMoeForCausalLM,
    "mixtral": MixtralForCausalLM,
}
# llama.cpp's architecture names (gguf-py MODEL_ARCH_NAMES); DeepSeek V2, V2-Lite, V3 and R1 share one.
GGUF_ARCHITECTURES = {
    "deepseek2": DeepseekForCausalLM,
    "qwen2moe": QwenMoeForCausalLM,
    "qwen3moe": QwenMoeForCausalLM,
    "llama": MixtralForCausalLM,  # llama.cpp writes Mixtral as 'llama' with experts
}


def model_class(hf_config: dict):
    """The model class for an HF config.json dict; unknown architectures fail listing the supported ones."""
    for arch in hf_config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if hf_config.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[hf_config["model_type"]]
    named = hf_config.get("architectures") or hf_config.get("model_type") or "none given"
    raise TandemError(
        f"unsupported model architecture {named}; tandem supports: {', '.join(sorted(ARCHITECTURES))}"
    )


def build_model(hf_config: dict):
    cls = model_class(hf_config)
    return cls(cls.config_class.from_hf(hf_config))


def gguf_model_class(metadata: dict):
    """The model class for GGUF metadata's general.architecture; unknown ones fail listing the supported."""
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise TandemError(
            f"unsupported GGUF architecture {arch or 'none given'}; tandem reads GGUF models of: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return GGUF_ARCHITECTURES[arch]
