"""Model path -> config, tokenizer, and a built model with its weights, streamed tensor by tensor.

A model is an HF directory (config.json, tokenizer files, *.safetensors) or a GGUF model (a .gguf
file, any part of a split one, or a folder holding one model's parts) whose metadata carries the
config and the tokenizer. `config_dir` (--config-dir) takes config.json and the tokenizer from an
HF directory instead, while the weights still come from the GGUF.

The model is built on the meta device (no memory, no init), given real storage once, and filled
from the checkpoint one tensor at a time, so a model is never held twice. GGUF routed experts that
are quantized stay in the file's blocks (`bind_block_experts`); everything else is dequantized to
the model dtype as it streams, except GPU linears and the embedding in a format the GPU kernels
read (`bind_gpu_blocks`: they keep the file's blocks on the GPU).
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.errors import TandemError
from tandem.layers.rope import RopeConfig, rope_frequencies
from tandem.models.gguf_meta import f32_decimal
from tandem.models.registry import gguf_model_class, model_class
from tandem.runtime.experts import bind_block_experts
from tandem.runtime.gpu_weights import bind_gpu_blocks
from tandem.runtime.plan import cpu_block_rename, materialize
from tandem.runtime.sampling import load_generation_defaults, valid_defaults
from tandem.runtime.tokenizer import Tokenizer
from tandem.runtime.tokenizer_gguf import tokenizer_from_gguf
from tandem.weights.checkpoint import Checkpoint
from tandem.weights.derived import DerivedCheckpoint
from tandem.weights.gguf import GGUFCheckpoint
from tandem.weights.loader import load_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# general.sampling.* (newer llama.cpp converters) -> SamplingParams fields
GGUF_SAMPLING = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.exists():
        raise TandemError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise TandemError(f"model path {str(path)!r} is not a directory; give an HF model directory or a .gguf file")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise TandemError(f"{cfg} is missing: an HF model directory needs config.json beside its weights")
    try:
        data = json.loads(cfg.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TandemError(f"{cfg} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TandemError(f"{cfg} must hold a JSON object (the model's config), not a {type(data).__name__}")
    return data


def is_gguf(path: Path) -> bool:
    """A .gguf file, or a folder with .gguf files and no safetensors weights."""
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and any(path.glob("*.gguf")) and not any(path.glob("*.safetensors"))


# A decoder layer's index in a tensor name: GGUF's blk.N., HF's model.layers.N. (any prefix).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:blk|layers)\.(\d+)\.")
def check_rope_scaling(cfg, where: str) -> None:
    """Compute the config's rotary frequencies once, at 2 dims (cheap): a rope_scaling value of the
    wrong type or range (a factor of "x" or 0, original_max_position_embeddings of -1) fails here,
    naming the file, instead of deep inside building the model or as NaN logits later."""
    scaling = getattr(cfg, "rope_scaling", ())
    if not scaling:
        return
    try:
        rope = RopeConfig(dim=2, theta=cfg.rope_theta, scaling=scaling,
                          max_position_embeddings=cfg.max_position_embeddings)
        inv_freq, scale = rope_frequencies(rope)
        finite = bool(inv_freq.isfinite().all()) and all(map(math.isfinite, (scale, rope.softmax_scale_factor())))
    except TandemError as e:  # an unsupported kind of scaling
        raise TandemError(f"{where}: {e}") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise TandemError(f"{where}: rope_scaling {dict(scaling)} is not valid ({type(e).__name__}: {e})") from None
    if not finite:
        raise TandemError(f"{where}: rope_scaling {dict(scaling)} gives non-finite rotary frequencies")


@dataclass
class ModelFiles:
    """Where a model's config, tokenizer and weights come from. Close it (or use `with`) when loaded."""

    path: Path
    hf: dict | None  # config.json of the HF model or of --config-dir; None: from GGUF metadata
    hf_dir: Path | None  # the folder holding config.json and the tokenizer files
    gguf: GGUFCheckpoint | None

    def model_class(self):
        if self.hf is None:
            return gguf_model_class(self.gguf.metadata)
        archs, model_type = self.hf.get("architectures"), self.hf.get("model_type")
        if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise TandemError(f"{self.hf_dir / 'config.json'}: architectures {archs!r} should be a list of class "
                              'names, like ["DeepseekV3ForCausalLM"]')
        if model_type is not None and not isinstance(model_type, str):
            raise TandemError(f"{self.hf_dir / 'config.json'}: model_type {model_type!r} should be a name, "
                              'like "deepseek_v3"')
        return model_class(self.hf)

    def config(self):
        cls = self.model_class()
        if self.hf is None and not hasattr(cls.config_class, "from_gguf"):
            raise TandemError(f"{cls.__name__} cannot read its config from GGUF metadata yet — pass --config-dir")
        where = "config.json" if self.hf is not None else "the GGUF metadata"
        try:
            if self.hf is not None:
                cfg = cls.config_class.from_hf(self.hf)
            else:
                cfg = cls.config_class.from_gguf(self.gguf.metadata, self.gguf.names())
        except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as e:
            # A value of the wrong type or range in the file (the configs check what they keep).
            raise TandemError(f"{self.path}: {where} does not describe a {cls.__name__.replace('ForCausalLM', '')} "
                              f"model ({type(e).__name__}: {e})") from None
        except TandemError as e:  # the configs' own checks (types, ranges, sizes), which know no file
            raise TandemError(f"{self.path}: {where}: {e}") from None
        check_rope_scaling(cfg, f"{self.path}: {where}")
        return cfg

    def check_layer_count(self, layers: int) -> None:
        """Refuse a config whose layer count the weights do not have, before the model is built
        from it (a corrupt block_count of 10**8 would build layers until memory runs out)."""
        if self.gguf is not None:
            names = self.gguf.names()
        else:
            with Checkpoint.open(self.path) as ckpt:
                names = ckpt.names()
        found = [int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))]
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise TandemError(f"{self.path}: the config's layer count {layers!r} is not a positive integer")
        if not found:
            raise TandemError(f"{self.path}: the config says {layers} layers but the weights hold none (no tensor "
                              "named like model.layers.N.* or blk.N.*): these are not a decoder model's weights")
        if layers > max(found) + 1:
            raise TandemError(f"{self.path}: the config says {layers} layers but the weights hold layers 0.."
                              f"{max(found)}: the file's metadata (block_count / num_hidden_layers) is wrong")

    def tokenizer(self) -> Tokenizer:
        if self.hf_dir is not None:
            return Tokenizer.from_dir(self.hf_dir)
        return tokenizer_from_gguf(self.gguf.metadata, str(self.path))

    def generation_defaults(self) -> dict:
        if self.hf_dir is not None:
            return load_generation_defaults(self.hf_dir)
        found = {}
        for key, field in GGUF_SAMPLING.items():
            if (value := self.gguf.metadata.get(f"general.sampling.{key}")) is not None:
                found[f"general.sampling.{key}"] = (field, f32_decimal(value) if isinstance(value, float) else value)
        return valid_defaults(found, str(self.path))

    @property
    def stored_dtype(self) -> str | None:
        """'float32' when the weights are stored in float32, else what config.json says (or None)."""
        if self.gguf is not None:
            return "float32" if self.gguf.metadata.get("general.file_type") == 0 else None  # 0: ALL_F32
        return self.hf.get("torch_dtype") or self.hf.get("dtype")

    def close(self) -> None:
        if self.gguf is not None:
            self.gguf.close()

    def __enter__(self) -> "ModelFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model_files(model: str | Path, config_dir: str | Path | None = None) -> ModelFiles:
    """Find a model's files and read their headers (config, GGUF metadata); loads no weights."""
    path = Path(model)
    if not is_gguf(path):
        if config_dir is not None:
            raise TandemError(f"--config-dir is for GGUF models, but {path} is not a .gguf file or a folder of them")
        return ModelFiles(path, read_config(path), path, None)
    hf = read_config(config_dir) if config_dir is not None else None
    if config_dir is not None and not (Path(config_dir) / "tokenizer.json").is_file():
        raise TandemError(f"--config-dir {config_dir} has no tokenizer.json: give the model's HF folder")
    return ModelFiles(path, hf, Path(config_dir) if config_dir is not None else None, GGUFCheckpoint.open(path))


def resolve_dtype(name: str, hf_config: dict) -> torch.dtype:
    """'auto': fp32 checkpoints stay fp32; anything else runs in bf16 (fp16 is slow on CPUs)."""
    if name == "auto":
        stored = hf_config.get("torch_dtype") or hf_config.get("dtype")
        return torch.float32 if stored == "float32" else torch.bfloat16
    if name not in DTYPES:
        raise TandemError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def meta_model(cls, cfg, dtype: torch.dtype) -> torch.nn.Module:
    """Model class `cls` built on the meta device (no memory) with its dtypes set; routers stay fp32."""
    with torch.device("meta"):
        net = cls(cfg)
    net = net.to(dtype)
    for module in net.modules():
        # Routers stay fp32: top-k choices must not flip because of bf16 rounding.
        if getattr(module, "KEEP_FP32", False):
            module.float()
    return net


def checkpoint_view(files: ModelFiles, net: torch.nn.Module) -> tuple:
    """(checkpoint, rename, ignore, derived) for loading `net` from `files`; reads headers only.

    derived: {name: (sources, shape, combine)} of tensors the model builds from others (GGUF)."""
    if files.gguf is None:
        return Checkpoint.open(files.path), net.renamer(), tuple(net.ignore), {}
    if not hasattr(net, "gguf_renamer"):
        raise TandemError(f"{type(net).__name__} cannot load GGUF weights yet; use its HF safetensors")
    ckpt = files.gguf
    derived = net.gguf_derived({n: ckpt.shape(n) for n in ckpt.names()}) if hasattr(net, "gguf_derived") else {}
    view = DerivedCheckpoint(ckpt, derived) if derived else ckpt
    return view, net.gguf_renamer(), tuple(getattr(net, "gguf_ignore", ())), derived


def load_model(
    model: "str | Path | ModelFiles",
    dtype: torch.dtype,
    device="cpu",
    progress: bool = True,
    config_dir: str | Path | None = None,
    placement=None,
) -> torch.nn.Module:
    """Build the model at `model` (a path or opened ModelFiles) and fill it with its weights.

    placement (tandem.placement.rules.Placement): each parameter gets storage on its rule's device
    (routed experts bound for the CPU engine stay in CPU RAM); None puts everything on `device`.
    """
    files = model if isinstance(model, ModelFiles) else open_model_files(model, config_dir)
    try:
        net = meta_model(files.model_class(), files.config(), dtype)
        ckpt, rename, ignore, derived = checkpoint_view(files, net)
        if files.gguf is not None:
            # Quantized routed experts that stay on the CPU keep the file's blocks; the loader
            # skips their tensors. Experts placed on a GPU load dequantized like other weights.
            bind = rename if placement is None else cpu_block_rename(rename, net, placement)
            kept = bind_block_experts(net, ckpt, bind)
            if placement is not None:  # GPU linears and embedding keep their blocks (placement/memory.py)
                kept += bind_gpu_blocks(net, ckpt, rename, placement, derived)
            ignore += tuple(re.escape(n) for n in kept)
        net = net.to_empty(device=device) if placement is None else materialize(net, placement)
        with ckpt:
            load_state(ckpt, dict(net.named_parameters()), rename, ignore=ignore, progress=progress)
    finally:
        if files is not model:
            files.close()
    return net.eval()
