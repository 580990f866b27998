"""A tiny DeepSeek-V3-style tokenizer for tests: byte-level BPE, special tokens, chat template.

`write_tokenizer(out_dir)` trains a byte-level BPE on the small text below and writes
`tokenizer.json`, `tokenizer_config.json` and `generation_config.json`, laid out like a
DeepSeek-V3 checkpoint so both `tandem.runtime.tokenizer.Tokenizer.from_dir` and HF
`AutoTokenizer.from_pretrained` load it. The output is deterministic for a given vocab size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tandem.errors import TandemError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Our own template for the DeepSeek-V3 chat layout: bos, system text, then user / assistant
# turns; an assistant turn is closed by eos. Written on one line per block so that
# trim_blocks / lstrip_blocks leave no stray whitespace.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] %}"
    "{% endfor %}"
    "{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "<｜Assistant｜>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] != 'system' %}"
    "{{ raise_exception('Unsupported role ' + message['role'] + ': use system, user or assistant.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

# Training text: English prose, Python code and some non-ASCII, so the merges cover all three.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts out of many; the router scores each expert and keeps the top ones. Large language models
read text as tokens, predict the next token, and repeat until they reach the end of the answer.
We run the attention layers on the GPU and the experts on the CPU, because the experts are large
but each token only needs a handful of them. Memory bandwidth, not compute, limits the decode step.
Hello! How are you today? I am fine, thank you. What is the capital of France? It is Paris.
Please write a short poem about the sea. The sea is wide, the sea is deep, the waves are singing
me to sleep. Explain why the sky is blue: sunlight scatters off the air, and blue light scatters
more than red light. Summarize the following paragraph in one sentence. Translate this into German.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]

class Router(torch.nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(hidden_size, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.gate(x).softmax(dim=-1)
        weights, ids = scores.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how can I help?"}
int main(void) { printf("hello, world\\n"); return 0; }

Le café est délicieux, et la crème brûlée aussi. Où est la gare ? À bientôt, mon ami.
Größe, Straße, schön, über, Mädchen, Fußball. ¿Dónde está la biblioteca? Mañana será otro día.
Привет, как дела? Спасибо, хорошо. Γειά σου κόσμε. Καλημέρα.
你好，世界！今天天气很好。我们一起学习机器学习和自然语言处理。专家混合模型。
こんにちは、世界。ありがとうございます。日本語のテキストです。
안녕하세요. 감사합니다. 🙂 🚀 ✨ 👍 — “quotes” and ‘apostrophes’ … €100, £50, ¥1000, 30°C, α β γ δ π ∑ √ ∞.
"""

_MIN_EXTRA = 4  # User, Assistant, <think>, </think> are added after training


def write_tokenizer(out_dir: str | Path, vocab_size: int = 512, corpus: Iterable[str] | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into `out_dir`.

    The total vocabulary (with special tokens) is exactly `vocab_size`, because models size
    their embedding by it: if the corpus runs out of merges, reserved placeholder tokens fill
    the gap, as DeepSeek-V3 itself does. `corpus` (lines of text) replaces the built-in training
    text, e.g. for the demo model's tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    smallest = 256 + 2 + _MIN_EXTRA  # byte alphabet + bos/eos + chat tokens
    if vocab_size < smallest:
        raise TandemError(f"tiny tokenizer vocab_size={vocab_size} is too small: use at least {smallest}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - _MIN_EXTRA,
        special_tokens=[BOS, EOS],  # ids 0 and 1, like DeepSeek-V3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() if corpus is None else corpus, trainer=trainer)

    missing = vocab_size - _MIN_EXTRA - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<｜place▁holder▁no▁{i}｜>" for i in range(missing)])
    tok.add_special_tokens([USER, ASSISTANT])
    # The think tags are plain added tokens: skip_special_tokens must keep them for reasoning parsers.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    # BOS comes from the post-processor, as in DeepSeek-V3's tokenizer.json; HF reads it from here.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError("tiny tokenizer vocabulary size is off; the placeholder arithmetic is wrong")
    tok.save(str(out / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 16384,
        "chat_template": CHAT_TEMPLATE,
    }
    generation = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", "utf-8")
