"""What the model files share for GGUF (llama.cpp) models: metadata access and tensor names.

Metadata arrives as a plain dict (the weights layer reads the file); each model maps its
`{arch}.*` keys onto its config dataclass in `from_gguf`. Tensor names follow gguf-py's table
(constants.py TENSOR_NAMES): `token_embd`, `blk.N.attn_q`, `blk.N.ffn_gate_exps` (experts merged
into one [E, ...] tensor), ...; the rules below map the names Llama-style decoders share.
"""

import torch

from tandem.errors import TandemError

GGUF_BLOCK = r"blk\.(?P<layer>\d+)\."
_REQUIRED = object()  # GGUFKeys' typed reads: no default, the key must be there


class GGUFKeys:
    """The `{arch}.*` keys of GGUF metadata (a plain dict), with a clear error for required ones."""

    def __init__(self, metadata: dict):
        self.metadata = metadata
        self.arch = metadata.get("general.architecture", "?")

    def __contains__(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.metadata

    def __getitem__(self, key: str):
        full = f"{self.arch}.{key}"
        if full not in self.metadata:
            raise TandemError(
                f"the GGUF metadata lacks {full} — the file comes from a converter tandem does not know; "
                "give the model's HF config with --config-dir"
            )
        return self.metadata[full]

    def get(self, key: str, default=None):
        return self.metadata.get(f"{self.arch}.{key}", default)

    # Typed reads, as llama.cpp's loader checks a key's type: a string "8" or a bool is no size
    # (int() took them, and truncated 2.5), and bool("false") is true.
    def integer(self, key: str, default=_REQUIRED) -> int:
        return self._typed(key, default, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))

    def number(self, key: str, default=_REQUIRED) -> float:
        """A float key as the converter wrote it (see f32_decimal)."""
        value = self._typed(key, default, "a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool))
        return f32_decimal(value) if isinstance(value, float) else float(value)

    def flag(self, key: str, default=_REQUIRED) -> bool:
        return self._typed(key, default, "true or false", lambda v: isinstance(v, bool))

    def _typed(self, key: str, default, kind: str, ok):
        value = self[key] if default is _REQUIRED else self.get(key, default)
        if not ok(value):
            raise TandemError(f"{self.arch}.{key} = {value!r} should be {kind}: the file is corrupt; convert or "
                              "download it again")
        return value

    def vocab_size(self) -> int:
        """{arch}.vocab_size, else the length of the tokenizer's token list (older converters)."""
        if "vocab_size" in self or not self.metadata.get("tokenizer.ggml.tokens"):
            return self.integer("vocab_size")
        return len(self.metadata["tokenizer.ggml.tokens"])


def f32_decimal(x: float) -> float:
    """The shortest decimal that rounds to the same float32: GGUF stores floats as float32, so
    1e-6 comes back as 9.99999997e-07; this recovers the value the converter was given."""
    stored = torch.tensor(x, dtype=torch.float32).item()
    for digits in range(1, 10):
        candidate = float(f"{stored:.{digits}g}")
        if torch.tensor(candidate, dtype=torch.float32).item() == stored:
            return candidate
    return stored


def tied_embeddings(tensor_names) -> bool:
    """llama.cpp reuses token_embd as the output head when a file has no output.weight."""
    return bool(tensor_names) and "output.weight" not in tensor_names


def gguf_decoder_rules() -> list[tuple[str, str]]:
    """GGUF names every decoder here shares: embeddings, final norm, head, per-layer norms."""
    return [
        (r"token_embd\.weight", "embed.weight"),
        (r"output_norm\.weight", "norm.weight"),
        (r"output\.weight", "lm_head.weight"),
        (GGUF_BLOCK + r"attn_norm\.weight", "layers.{layer}.attn_norm.weight"),
        (GGUF_BLOCK + r"ffn_norm\.weight", "layers.{layer}.ffn_norm.weight"),
    ]


def gguf_gqa_rules() -> list[tuple[str, str]]:
    """Llama-style attention: q/k/v/o (weights and biases) and Qwen3's per-head q/k norms."""
    attn = "layers.{layer}.attn."
    return [
        (GGUF_BLOCK + r"attn_(?P<p>q|k|v)\.(?P<t>weight|bias)", attn + "{p}_proj.{t}"),
        (GGUF_BLOCK + r"attn_output\.(?P<t>weight|bias)", attn + "o_proj.{t}"),
        (GGUF_BLOCK + r"attn_(?P<p>q|k)_norm\.weight", attn + "{p}_norm.weight"),
    ]


def gguf_ffn_rules() -> list[tuple[str, str]]:
    """Router, routed experts (merged, or one tensor per expert in old files), shared expert and
    its gate, dense FFN."""
    ffn = "layers.{layer}.ffn."
    return [
        (GGUF_BLOCK + r"ffn_gate_inp\.weight", ffn + "router.weight"),
        (GGUF_BLOCK + r"ffn_gate_inp_shexp\.weight", ffn + "shared_gate.weight"),
        (GGUF_BLOCK + r"ffn_(?P<p>gate|up|down)_exps\.weight", ffn + "experts.w_{p}"),
        (GGUF_BLOCK + r"ffn_(?P<p>gate|up|down)\.(?P<e>\d+)\.weight", ffn + "experts.w_{p}[{e}]"),
        (GGUF_BLOCK + r"ffn_(?P<p>gate|up|down)_shexp\.weight", ffn + "shared.{p}_proj.weight"),
        (GGUF_BLOCK + r"ffn_(?P<p>gate|up|down)\.weight", ffn + "{p}_proj.weight"),
    ]
