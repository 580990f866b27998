"""A `Tokenizer` from GGUF metadata (tokenizer.ggml.*), for models given as a .gguf file alone.

llama.cpp's converter stores a byte-level BPE tokenizer as: model "gpt2", the vocabulary in id
order (byte-level strings, as in tokenizer.json), a type per token (normal, control = special,
user-defined = added but not special, unused, byte), the merges as "a b" strings, the special
ids, add_bos/add_eos flags, the chat template, and `pre`, the name of the pre-tokenizer
(the regexes that split text before BPE). We rebuild the same `tokenizers` pipeline:
pre-tokenizer by `pre` name -> BPE(vocab, merges) -> added tokens -> BOS/EOS post-processor ->
byte-level decoder. Only BPE ("gpt2") with known `pre` names is supported; for anything else the
message says to pass the HF tokenizer with --config-dir.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from tandem.errors import TandemError
from tandem.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# gguf-py TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The regexes of the models' own tokenizer.json files (llama.cpp's llama-vocab.cpp carries
# ports of the same expressions under these `pre` names).
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",  # CJK ideographs, hiragana, katakana (a Python escape: the character itself)
    (
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)


def _byte_level(regexes: tuple[str, ...]) -> Callable[[], Any]:
    """Split on each regex in turn (isolating matches), then map bytes to byte-level symbols."""

    def build() -> Any:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    return build


def _gpt2() -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own regex


PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {
    "default": _gpt2,
    "gpt-2": _gpt2,
    "llama-bpe": _byte_level((_LLAMA3,)),
    "llama3": _byte_level((_LLAMA3,)),
    "qwen2": _byte_level((_QWEN2,)),
    "deepseek-v3": _byte_level(_DEEPSEEK_V3),
}
# Llama 3's tokenizer.json looks whole words up in the vocabulary before merging.
_IGNORE_MERGES = {"llama-bpe", "llama3"}


def tokenizer_from_gguf(metadata: dict[str, Any], source: str) -> Tokenizer:
    """Build the tokenizer that a GGUF file's tokenizer.ggml.* metadata describes."""
    fix = "pass the model's HF tokenizer with --config-dir DIR (a folder holding tokenizer.json)"
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TandemError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only BPE, 'gpt2') — {fix}")
    pre = metadata.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise TandemError(
            f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)}) — {fix}"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise TandemError(f"{source}: the GGUF metadata has no tokenizer vocabulary or merges — {fix}")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TandemError(f"{source}: the GGUF tokenizer vocabulary is not a list of strings — {fix}")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise TandemError(f"{source}: the GGUF tokenizer merges are not a list of strings — {fix}")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not isinstance(types, list) or not all(isinstance(t, int) for t in types):
        raise TandemError(f"{source}: the GGUF token types are not a list of integers — {fix}")
    if len(types) != len(tokens):
        raise TandemError(f"{source}: {len(tokens)} tokens but {len(types)} token types in the GGUF metadata — {fix}")

    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # byte-level symbols never hold a space, but a merge may start with one
        if cut < 0:
            raise TandemError(f"{source}: malformed GGUF merge {merge!r} — {fix}")
        pairs.append((merge[:cut], merge[cut + 1:]))
    vocab = {token: i for i, token in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as e:  # noqa: BLE001 -- the tokenizers library raises plain Exception here
        raise TandemError(f"{source}: the GGUF tokenizer does not build ({e}; e.g. a merge of tokens the "
                          f"vocabulary lacks) — {fix}") from None
    backend = _HFTokenizer(bpe)
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # Control tokens are special (skipped by skip_special_tokens); user-defined ones are matched
    # whole in the text but kept when decoding (e.g. DeepSeek-R1's <think>).
    added = [
        AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (CONTROL, USER_DEFINED)
    ]
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])

    def token_of(key: str) -> tuple[int, str] | None:
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if i is None:
            return None
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens):
            return i, tokens[i]
        # As llama.cpp does, go on without the token -- but say so: without eos, generation never stops on its own.
        log.warning("%s: tokenizer.ggml.%s_token_id = %r is not a token id (the vocabulary has %d); ignored",
                    source, key, i, len(tokens))
        return None

    bos, eos = token_of("bos"), token_of("eos")
    backend.post_processor = _post_processor(
        bos if metadata.get("tokenizer.ggml.add_bos_token", False) else None,
        eos if metadata.get("tokenizer.ggml.add_eos_token", False) else None,
    )
    named = {"bos_token": bos, "eos_token": eos, "pad_token": token_of("padding"), "unk_token": token_of("unknown")}
    # End-of-turn / end-of-message ids stop generation too, as in llama.cpp.
    stops = [t[0] for t in (eos, token_of("eot"), token_of("eom")) if t is not None]
    return Tokenizer(
        backend,
        bos_id=bos[0] if bos else None,
        eos_ids=stops,
        chat_template=metadata.get("tokenizer.chat_template"),
        special_tokens={k: v[1] for k, v in named.items() if v is not None},
        source=source,
    )


def _post_processor(bos: tuple[int, str] | None, eos: tuple[int, str] | None) -> Any:
    first = ([bos[1]] if bos else []) + ["$A"] + ([eos[1]] if eos else [])
    second = ([bos[1]] if bos else []) + ["$B:1"] + ([eos[1]] if eos else [])
    specials = [(t[1], t[0]) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=" ".join(first), pair=" ".join(first + second), special_tokens=specials)
