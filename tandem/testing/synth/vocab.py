"""A byte-level BPE vocabulary of the real model's size, as tokenizer.ggml.* keys.

Every byte is a token (GPT-2's byte-to-unicode symbols), plus a few English merges so that BPE
has something to do, the model's special tokens at their real ids, and "[PADn]" tokens (type
UNUSED, as llama.cpp's converter pads) up to the real vocabulary size. Both tandem's GGUF
tokenizer and llama.cpp's BPE load it; text round-trips, it just takes about a token per byte.
"""

from __future__ import annotations

from gguf import GGUFWriter, TokenType

_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n"), ("r", "e"), ("o", "n"), ("Ġt", "he"), ("e", "r"),
           ("Ġ", "s"), ("a", "t"), ("Ġ", "w"), ("o", "r"), ("e", "n"), ("Ġ", "c"), ("i", "s"), ("Ġ", "o"),
           ("e", "s"), ("a", "n"), ("Ġ", "b"), ("e", "d"), ("Ġ", "f"), ("in", "g"), ("Ġ", "p"), ("o", "u"),
           ("Ġ", "m"), ("a", "r"), ("Ġ", "d"), ("a", "l"), ("Ġ", "h"), ("l", "e")]

# family -> (special tokens by role, chat template, add_bos)
_DEEPSEEK_V3 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
_DEEPSEEK_V2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _specials(cfg: dict) -> tuple[dict[int, str], str, bool]:
    """{id: token} of the special tokens, the chat template, add_bos."""
    bos, eos, name = cfg["bos"], cfg["eos"], cfg["name"]
    if name == "DeepSeek-V3":
        end = cfg["vocab_size"] - (129280 - 128803)  # real ids 128803 / 128804, kept from the end
        return ({bos: "<｜begin▁of▁sentence｜>", eos: "<｜end▁of▁sentence｜>", end: "<｜User｜>",
                 end + 1: "<｜Assistant｜>"}, _DEEPSEEK_V3, True)
    if name.startswith("DeepSeek"):
        return {bos: "<｜begin▁of▁sentence｜>", eos: "<｜end▁of▁sentence｜>"}, _DEEPSEEK_V2, True
    if name.startswith("Qwen"):
        return {bos: "<|endoftext|>", bos + 1: "<|im_start|>", eos: "<|im_end|>"}, _CHATML, False
    return {0: "<unk>", bos: "<s>", eos: "</s>"}, _MISTRAL, True


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest map to 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def add_tokenizer(w: GGUFWriter, cfg: dict) -> None:
    """tokenizer.ggml.* (model gpt2) for a vocabulary of cfg['vocab_size'] tokens."""
    n = cfg["vocab_size"]
    specials, template, add_bos = _specials(cfg)
    tokens: list[str | None] = [None] * n
    types = [int(TokenType.UNUSED)] * n
    for i, tok in specials.items():
        tokens[i], types[i] = tok, int(TokenType.CONTROL)
    normal = _byte_symbols() + [a + b for a, b in _MERGES]
    free = (i for i in range(n) if tokens[i] is None)
    for tok, i in zip(normal, free):
        tokens[i], types[i] = tok, int(TokenType.NORMAL)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(cfg["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in _MERGES])
    w.add_bos_token_id(cfg["bos"])
    w.add_eos_token_id(cfg["eos"])
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(template)
