"""Architecture registry: HF `architectures` / `model_type` -> model class. One line per model."""

from tandem.errors import TandemError
from tandem.models.deepseek import DeepseekForCausalLM

ARCHITECTURES = {
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
}
MODEL_TYPES = {
    "deepseek_v2": DeepseekForCausalLM,
    "deepseek_v3": DeepseekForCausalLM,
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
