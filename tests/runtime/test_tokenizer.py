"""Tokenizer, chat templates, streaming decode and stop strings, checked against transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from tandem.errors import TandemError
from tandem.runtime.tokenizer import StopStrings, Tokenizer
from tandem.testing.tiny_tokenizer import write_tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    # system + several turns, ending with a user turn
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    # non-ASCII everywhere, two system prompts, special-token text inside a message
    [
        {"role": "system", "content": "Réponds en français."},
        {"role": "system", "content": "Sois bref 🙂"},
        {"role": "user", "content": "Où est la gare ? 你好，世界！"},
        {"role": "assistant", "content": "<think>simple</think>À gauche. Привет!"},
        {"role": "user", "content": "Merci — ありがとう"},
    ],
    # no system prompt, ends with an assistant turn, multi-line code
    [
        {"role": "user", "content": "def f(x):\n    return x * 2\n\nWhat does f(3) return?"},
        {"role": "assistant", "content": "It returns `6`.\n"},
    ],
]

TEXTS = [
    "",
    "Hello world",
    "  leading spaces and trailing  ",
    "Le café est délicieux. 你好，世界！ 🙂🚀 Γειά σου",
    "def f(x):\n\treturn x ** 2  # comment\n",
    "<｜begin▁of▁sentence｜>inline <｜User｜>special<think>tokens</think><｜end▁of▁sentence｜>",
    "unseen bytes: \x00\x7f ǅ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]

# A ChatML-like template of our own that uses the jinja features real templates rely on.
CUSTOM_TEMPLATE = """\
{%- set ns = namespace(system='', users=0) -%}
{%- for m in messages -%}
    {%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- endif -%}
    {%- if m.role == 'user' -%}{%- set ns.users = ns.users + 1 -%}{%- endif -%}
{%- endfor -%}
{{ bos_token }}
{%- if tools is not none %}
<tools>{{ tools | tojson }}</tools>
<pretty>{{ tools | tojson(indent=2) }}</pretty>
{% endif %}
{% if ns.system %}
[SYS] {{ ns.system }} (year {{ strftime_now('%Y') }}, {{ ns.users }} user turns)
{% endif %}
{% for m in messages if m.role != 'system' %}
    {% if m.role not in ['user', 'assistant', 'tool'] %}
        {{ raise_exception('Role ' ~ m.role ~ ' is not supported by this template') }}
    {% endif %}
    {% if m.content == 'SKIP' %}{% continue %}{% endif %}
<|{{ m.role }}|>
    {% if m.role == 'assistant' %}
        {% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
{% generation %}{{ m.content if m.content is defined else '' }}{% endgeneration %}
        {% if m.tool_calls is defined %}<calls>{{ m.tool_calls | tojson }}</calls>{% endif %}
    {% else %}
{{ m.content }}
    {% endif %}
    {% if loop.last %}
        {% if add_generation_prompt %}
<|assistant|>
        {% endif %}
    {% else %}
{{ eos_token }}
    {% endif %}
{% endfor %}"""

TOOLS = [{"type": "function", "function": {"name": "météo", "description": "Weather <b>now</b> & later",
                                           "parameters": {"z": 1, "a": [1, 2]}}}]

CUSTOM_CONVERSATIONS = [
    CONVERSATIONS[0],
    [
        {"role": "system", "content": "Sé útil."},
        {"role": "user", "content": "Tiempo en Zürich?"},
        {"role": "assistant", "content": None, "reasoning": "need tool",
         "tool_calls": [{"name": "météo", "arguments": {"city": "Zürich"}}]},
        {"role": "tool", "content": "12°C"},
        {"role": "user", "content": "SKIP"},
        {"role": "user", "content": "Gracias 🙂"},
    ],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def custom_dir(tiny_dir, tmp_path_factory):
    """The tiny tokenizer with CUSTOM_TEMPLATE as chat_template.jinja (which beats the config's template)."""
    d = tmp_path_factory.mktemp("custom_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, d / name)
    (d / "chat_template.jinja").write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    return d


def test_tiny_tokenizer_has_exact_vocab_size_and_is_deterministic(tmp_path):
    for size in (300, 512, 2000):  # 2000 runs out of merges and needs placeholders
        write_tokenizer(tmp_path / str(size), vocab_size=size)
        assert Tokenizer.from_dir(tmp_path / str(size)).vocab_size == size
    write_tokenizer(tmp_path / "again", vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "512" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    with pytest.raises(TandemError, match="too small"):
        write_tokenizer(tmp_path / "small", vocab_size=100)


def test_special_ids_match_hf(ours, hf):
    assert ours.vocab_size == len(hf) == 512
    assert ours.bos_id == hf.bos_token_id == 0
    assert ours.eos_ids == {hf.eos_token_id} == {1}


def test_generation_config_adds_stop_ids(tiny_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 508, 509]}))
    assert Tokenizer.from_dir(tmp_path).eos_ids == {1, 508, 509}


@pytest.mark.parametrize("bad", [512, -1, 10**20, "508", True])
def test_generation_config_ids_outside_the_vocabulary_are_reported(tiny_dir, tmp_path, caplog, bad):
    """Fuzzing: generation_config.json's out-of-range ids were kept (or dropped) silently, so an eos
    that is no token left generation to run to max tokens. They are ignored with a warning naming the
    file, the id and the vocabulary size."""
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    del config["bos_token"]  # so generation_config's bos_token_id is the one read
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": bad, "eos_token_id": [509, bad]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id is None and tok.eos_ids == {1, 509}
    file = tmp_path / "generation_config.json"
    for key in ("bos_token_id", "eos_token_id"):
        assert f"{file}: {key} = {bad!r} is not a token id (the vocabulary has 512); ignored" in caplog.text
    assert "eos_token_id = " + repr(bad) + " is not a token id (the vocabulary has 512); ignored: generation does " \
        "not stop on it" in caplog.text


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(ours, hf, text):
    for add_special in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_bos_comes_from_the_post_processor_like_hf(tiny_dir, tmp_path):
    # transformers 5 ignores add_bos_token when tokenizer.json exists: only its post-processor adds BOS.
    tj = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tj["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    shutil.copy(tiny_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    hf_plain = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.encode("Hello") == hf_plain.encode("Hello")
    assert ours.encode("Hello")[0] != ours.bos_id
    assert Tokenizer.from_dir(tiny_dir).encode("Hello")[0] == 0


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_hf(ours, hf, conversation, add_generation_prompt):
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.encode_chat(conversation, add_generation_prompt=add_generation_prompt) == expected
    assert text.startswith("<｜begin▁of▁sentence｜>")
    assert text.endswith("<｜Assistant｜>") == add_generation_prompt


def test_tiny_template_layout(ours):
    text = ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    assert text == ("<｜begin▁of▁sentence｜>You are a terse assistant.<｜User｜>What is 2 + 2?"
                    "<｜Assistant｜>4.<｜end▁of▁sentence｜><｜User｜>And 3 + 3?<｜Assistant｜>")


@pytest.fixture(scope="module")
def custom_pair(custom_dir):
    return Tokenizer.from_dir(custom_dir), transformers.AutoTokenizer.from_pretrained(str(custom_dir))


@pytest.mark.parametrize("conversation", CUSTOM_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_custom_template_matches_hf(custom_pair, conversation, add_generation_prompt, tools):
    ours, hf = custom_pair
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tools=tools)
    hf_text = hf.apply_chat_template(conversation, tools=tools, tokenize=False,
                                     add_generation_prompt=add_generation_prompt)
    assert text == hf_text
    hf_ids = hf.apply_chat_template(conversation, tools=tools, tokenize=True, return_dict=False,
                                    add_generation_prompt=add_generation_prompt)
    assert ours.encode_chat(conversation, add_generation_prompt=add_generation_prompt, tools=tools) == hf_ids
    assert "<|user|>" in text  # chat_template.jinja won over tokenizer_config's template
    if tools:
        assert '"météo"' in text and "<b>now</b> & later" in text  # tojson: no ASCII or HTML escaping


def test_template_raise_exception_becomes_tandem_error(custom_pair):
    ours, hf = custom_pair
    bad = [{"role": "narrator", "content": "Once upon a time"}]
    with pytest.raises(TandemError, match="Role narrator is not supported by this template"):
        ours.apply_chat_template(bad)
    with pytest.raises(Exception, match="Role narrator is not supported"):
        hf.apply_chat_template(bad, tokenize=False)


def test_template_list_in_config_picks_default(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT"


def test_missing_template_and_files_raise_tandem_errors(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    no_template = Tokenizer.from_dir(tmp_path)  # no tokenizer_config.json at all
    with pytest.raises(TandemError, match="no chat template.*generate --prompt"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TandemError, match="tokenizer.json"):
        Tokenizer.from_dir(empty)
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TandemError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_stream_decoder_holds_partial_characters(ours):
    text = "Grüße 你好，世界！ 🙂🚀 done"
    ids = ours.encode(text)
    stream = ours.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    tail = stream.flush()
    assert "".join(pieces) + tail == ours.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some token ended mid-character and was held back
    assert tail == ""


def test_stream_decoder_skips_special_tokens_like_decode(ours):
    ids = ours.encode_chat(CONVERSATIONS[1], add_generation_prompt=True) + ours.encode("Très bien 🙂", False)
    for skip in (False, True):
        stream = ours.stream_decoder(skip_special_tokens=skip)
        out = "".join(stream.push(i) for i in ids) + stream.flush()
        assert out == ours.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_flush_releases_incomplete_character(ours):
    ids = ours.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    stream = ours.stream_decoder()
    held = "".join(stream.push(i) for i in ids[:-1])
    assert held == ""
    assert stream.flush() == ours.decode(ids[:-1])


def test_stop_strings_across_pieces():
    stops = StopStrings(("<|stop|>", "END"))
    out = []
    hit = False
    for piece in ["Hello <", "|st", "op", "|> never shown"]:
        text, hit = stops.feed(piece)
        out.append(text)
        if hit:
            break
    assert hit and "".join(out) == "Hello "
    assert out[0] == "Hello "  # "<" held: it may start a stop string
    assert stops.feed("more") == ("", True)


def test_stop_strings_release_false_alarms_and_flush():
    stops = StopStrings(("END",))
    assert stops.feed("The EN") == ("The ", False)
    assert stops.feed("D") == ("", True)
    stops = StopStrings(("END",))
    assert stops.feed("The EN") == ("The ", False)
    assert stops.feed("emy") == ("ENemy", False)
    assert stops.feed(" E") == (" ", False)
    assert stops.flush() == "E"


def test_stop_strings_pick_the_earliest_stop_character_by_character():
    stops = StopStrings(("world", "lo w"))
    emitted = ""
    for ch in "hello world":
        text, hit = stops.feed(ch)
        emitted += text
        if hit:
            break
    assert hit and emitted == "hel"
    with pytest.raises(TandemError):
        StopStrings(("",))


def test_broken_gguf_tokenizer_metadata_is_a_clear_error():
    """Found by fuzzing: merges of unknown tokens and arrays of the wrong type ended in raw
    Exception / AttributeError / TypeError tracebacks."""
    from tandem.runtime.tokenizer_gguf import tokenizer_from_gguf

    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1]}
    tokenizer_from_gguf(base, "ok.gguf")
    for change, message in (
        ({"tokenizer.ggml.merges": ["x y"]}, "does not build"),
        ({"tokenizer.ggml.merges": [1, 2]}, "merges are not a list of strings"),
        ({"tokenizer.ggml.tokens": [1, 2, 3]}, "vocabulary is not a list of strings"),
        ({"tokenizer.ggml.token_type": ["x", "y", "z"]}, "token types are not a list of integers"),
    ):
        with pytest.raises(TandemError, match=message):
            tokenizer_from_gguf({**base, **change}, "bad.gguf")


def test_gguf_special_token_ids_outside_the_vocabulary_are_reported(caplog):
    """Found by fuzzing: an eos id past the vocabulary was dropped silently, so generation never
    stopped on its own. It is still ignored (as llama.cpp does), with a warning naming the file."""
    from tandem.runtime.tokenizer_gguf import tokenizer_from_gguf

    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 3]}
    assert tokenizer_from_gguf({**base, "tokenizer.ggml.eos_token_id": 2}, "ok.gguf").eos_ids == {2}
    assert not caplog.records
    for bad in (3, -1, True):
        caplog.clear()
        tok = tokenizer_from_gguf({**base, "tokenizer.ggml.eos_token_id": bad}, "bad.gguf")
        assert not tok.eos_ids
        assert any("bad.gguf: tokenizer.ggml.eos_token_id" in r.getMessage() and "ignored" in r.getMessage()
                   for r in caplog.records)
