"""OpenAI logprobs: chat (`logprobs` + `top_logprobs`) and legacy completions (`logprobs: N`),
streamed and not; values equal LLM.generate's; token strings and bytes; refusals name the parameter."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from tandem.runtime.engine import StepOutput
from tandem.runtime.logprobs import TokenLogprobs
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.tokenizer import Tokenizer
from tandem.serve.logprobs import UNLIKELY, CompletionLogprobs, TokenPieces, chat_logprobs
from tandem.serve.metrics import Metrics
from tandem.serve.model import Prompt, Run, ServedModel
from tests.serve.test_errors import assert_openai_error
from tests.serve.test_timings import sse_events

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e '.[test]'")

CHAT = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT = "The quick brown fox"


@pytest.fixture
def http(idle):
    with httpx.Client(base_url=idle.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


def _expected(reference, prompt, n: int, tokens: int = 8):
    out = reference.generate(prompt, max_new_tokens=tokens, temperature=0, ignore_eos=True, logprobs=n)
    assert len(out.logprobs) == tokens
    return out


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path, changes, message, param", [
    ("/v1/chat/completions", dict(logprobs=True, top_logprobs=21), "0..20", "top_logprobs"),
    ("/v1/chat/completions", dict(logprobs=True, top_logprobs=-1), "0..20", "top_logprobs"),
    ("/v1/chat/completions", dict(top_logprobs=2), "logprobs: true", "top_logprobs"),
    ("/v1/chat/completions", dict(logprobs=False, top_logprobs=0), "logprobs: true", "top_logprobs"),
    ("/v1/chat/completions", dict(logprobs=True, top_logprobs=2.5), "top_logprobs", "top_logprobs"),
    ("/v1/chat/completions", dict(logprobs=3), "logprobs", "logprobs"),  # chat's logprobs is a boolean
    ("/v1/completions", dict(logprobs=6), "0..5", "logprobs"),
    ("/v1/completions", dict(logprobs=-1), "0..5", "logprobs"),
    ("/v1/completions", dict(logprobs=True), "logprobs", "logprobs"),  # the legacy logprobs is a count
    ("/v1/completions", dict(logprobs=2, echo=True), "echo with logprobs", "echo"),
    ("/v1/completions", dict(echo=True), "echo is not supported", "echo"),
])
def test_bad_logprobs_requests_get_a_400_naming_the_parameter(http, path, changes, message, param):
    base = {"messages": CHAT} if "chat" in path else {"prompt": PROMPT}
    r = http.post(path, json={"model": "tiny", **base, "max_tokens": 2, **changes})
    assert_openai_error(r, 400, message, param)


# --- chat --------------------------------------------------------------------------------------


def _check_chat_entries(entries: list[dict], expected, n: int) -> None:
    assert len(entries) == len(expected.token_ids)
    for entry, token, lp in zip(entries, expected.token_ids, expected.logprobs):
        assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
        assert entry["logprob"] == pytest.approx(lp.logprob, abs=1e-4)
        assert len(entry["top_logprobs"]) == n
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([v for _, v in lp.top], abs=1e-4)
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the most likely token first
        for item in (entry, *entry["top_logprobs"]):
            assert all(isinstance(b, int) and 0 <= b < 256 for b in item["bytes"])
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8", errors="replace") == expected.text


def test_chat_logprobs(http, reference):
    expected = _expected(reference, CHAT, 3)
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 3}
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] == expected.text
    assert set(choice["logprobs"]) == {"content", "refusal"} and choice["logprobs"]["refusal"] is None
    _check_chat_entries(choice["logprobs"]["content"], expected, 3)


def test_chat_logprobs_without_top_logprobs_give_empty_top_lists(http, reference):
    expected = _expected(reference, CHAT, 0, tokens=4)
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": True}
    entries = http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in entries] == [[]] * 4
    assert [e["logprob"] for e in entries] == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-4)


def test_chat_stream_chunks_carry_their_tokens_logprobs(http, reference):
    expected = _expected(reference, CHAT, 2)
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2, "stream": True}
    choices = [e["choices"][0] for e in sse_events(http, "/v1/chat/completions", body)]
    first, *middle, last = choices
    assert first["logprobs"] is None and last["logprobs"] is None and last["finish_reason"] == "length"
    assert all(c["logprobs"] is not None and c["logprobs"]["content"] for c in middle)
    assert len(middle) > 1  # really streamed
    # Each chunk's entries are the tokens its text came from.
    for c in middle:
        text = bytes(b for e in c["logprobs"]["content"] for b in e["bytes"]).decode("utf-8", errors="replace")
        assert text == c["delta"].get("content", "") + c["delta"].get("reasoning_content", "")
    _check_chat_entries([e for c in middle for e in c["logprobs"]["content"]], expected, 2)


def test_chat_without_logprobs_says_null(http):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "temperature": 0}
    assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"] is None
    events = sse_events(http, "/v1/chat/completions", {**body, "stream": True})
    assert all(e["choices"][0]["logprobs"] is None for e in events)


def test_openai_client_parses_chat_logprobs(idle, reference):
    expected = _expected(reference, CHAT, 2, tokens=5)
    client = openai.OpenAI(base_url=idle.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and isinstance(c.top_logprobs[0].token, str) for c in content)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)


# --- completions -------------------------------------------------------------------------------


def _check_completion(lp: dict, expected, n: int, tokenizer: Tokenizer) -> None:
    pieces = TokenPieces(tokenizer)
    assert list(lp) == ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
    assert lp["tokens"] == [pieces(t)[0] for t in expected.token_ids]
    assert lp["token_logprobs"] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)
    for token, top, e in zip(lp["tokens"], lp["top_logprobs"], expected.logprobs):
        assert n <= len(top) <= n + 1 and top[token] == pytest.approx(e.logprob, abs=1e-4)  # the chosen one is in
        assert list(top.values())[:n] == pytest.approx([v for _, v in e.top], abs=1e-4)
    # Offsets count characters of the generated text: a token that starts a character starts its
    # text there (one that starts inside a character gets that character's offset: tested below).
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(expected.text)
    whole = [(o, t) for o, t in zip(offsets, lp["tokens"]) if "\\x" not in t]
    assert len(whole) > len(offsets) // 2
    for offset, text in whole:
        assert expected.text[offset:].startswith(text), (offset, text, expected.text)


@pytest.fixture
def completion_expected(reference):
    return lambda n: _expected(reference, PROMPT, n)


def test_completion_logprobs(http, completion_expected, tokenizer):
    expected = completion_expected(2)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == expected.text
    _check_completion(choice["logprobs"], expected, 2, tokenizer)


def test_completion_stream_logprobs_add_up_to_the_full_response(http, completion_expected, tokenizer):
    expected = completion_expected(1)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 1,
            "stream": True}
    choices = [e["choices"][0] for e in sse_events(http, "/v1/completions", body)]
    *middle, last = choices
    assert last["logprobs"] is None and len(middle) > 1
    merged = {k: [v for c in middle for v in c["logprobs"][k]]
              for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    _check_completion(merged, expected, 1, tokenizer)


def test_completion_logprobs_zero_reports_the_chosen_token_only(http, completion_expected):
    expected = completion_expected(0)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    lp = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert [list(top) for top in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]
    assert lp["token_logprobs"] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)


# --- token strings and bytes -------------------------------------------------------------------


def test_token_pieces_of_whole_and_partial_characters(tokenizer):
    pieces = TokenPieces(tokenizer)
    the = tokenizer.encode(" the", add_special_tokens=False)
    assert len(the) == 1 and pieces(the[0]) == (" the", b" the")
    # Byte-level BPE writes byte 0xE2 as the symbol "â": alone it is part of a character.
    lone = tokenizer.token_to_id("â")
    assert tokenizer.decode([lone]) == "\ufffd"
    assert pieces(lone) == ("\\xe2", b"\xe2")
    euro = tokenizer.encode("€", add_special_tokens=False)  # E2 82 AC
    assert b"".join(pieces(t)[1] for t in euro) == "€".encode()
    eos = next(iter(tokenizer.eos_ids))
    assert pieces(eos)[0] == tokenizer.decode([eos])


class _SentencePieceLike:
    """A tokenizer whose byte tokens are spelled <0xNN> (SentencePiece's byte fallback)."""

    vocab = {0: "<0xE2>", 1: "<0x82>", 2: "▁hi", 3: "<unk>"}

    def decode(self, ids):
        return {0: "\ufffd", 1: "\ufffd", 2: " hi", 3: "\ufffd"}[ids[0]]

    def id_to_token(self, token_id):
        return self.vocab[token_id]


def test_token_pieces_of_byte_fallback_tokens():
    pieces = TokenPieces(_SentencePieceLike())
    assert pieces(0) == ("\\xe2", b"\xe2") and pieces(1) == ("\\x82", b"\x82")
    assert pieces(2) == (" hi", b" hi")
    assert pieces(3) == ("\ufffd", "\ufffd".encode())  # no raw bytes known: the text as printed


def test_text_offsets_of_a_character_split_over_tokens():
    pieces = TokenPieces(_SentencePieceLike())
    entries = [TokenLogprobs(2, -0.5), TokenLogprobs(0, -1.0), TokenLogprobs(1, -2.0), TokenLogprobs(2, -0.1)]
    fmt = CompletionLogprobs(pieces)
    first, second = fmt(entries[:2]), fmt(entries[2:])  # two stream chunks
    # " hi" + (E2 82: one incomplete character, U+FFFD) + " hi"
    assert first["text_offset"] + second["text_offset"] == [0, 3, 3, 4]
    again = CompletionLogprobs(pieces)([TokenLogprobs(0, -1.0), TokenLogprobs(2, -1.0), TokenLogprobs(2, -1.0)])
    assert again["text_offset"] == [0, 1, 4]  # E2 alone, then " hi" twice


def test_non_finite_logprobs_become_very_unlikely_not_invalid_json():
    pieces = TokenPieces(_SentencePieceLike())
    entries = [TokenLogprobs(2, float("-inf"), ((2, float("nan")),))]
    chat = chat_logprobs(pieces, entries)
    completion = CompletionLogprobs(pieces)(entries)
    json.dumps([chat, completion], allow_nan=False)
    assert chat["content"][0]["logprob"] == chat["content"][0]["top_logprobs"][0]["logprob"] == UNLIKELY
    assert completion["token_logprobs"] == [UNLIKELY]


# --- which tokens' logprobs ride on which delta --------------------------------------------------


class _ScriptedEngine:
    """An AsyncEngine stand-in that answers every request with the given StepOutputs."""

    def __init__(self, outputs):
        self.outputs = outputs

    @contextlib.asynccontextmanager
    async def request(self, prompt, params):
        async def outputs():
            for out in self.outputs:
                yield out

        yield outputs()


def _deltas(reference, outputs, **params) -> tuple[list, Run]:
    model = ServedModel(reference.engine, "scripted", _ScriptedEngine(outputs), Metrics())
    run = Run(1)

    async def collect():
        return [d async for d in model.generate(Prompt([1]), SamplingParams(logprobs=1, **params), run)]

    return asyncio.run(collect())[1:], run  # the first delta only says the request was accepted


def test_held_back_tokens_ride_on_the_delta_that_shows_their_text_and_the_eos_is_left_out(reference):
    eos = next(iter(reference.tokenizer.eos_ids))
    a, b, c = (TokenLogprobs(t, -1.0 - t) for t in (10, 11, 12))
    deltas, run = _deltas(reference, [
        StepOutput(0, 10, "x", None, True, a),
        StepOutput(0, 11, "", None, False, b),  # part of a character: no text yet
        StepOutput(0, 12, "yz", None, False, c),
        StepOutput(0, eos, "", "stop", False, TokenLogprobs(eos, -0.1), True),  # as the Engine marks an eos end
    ])
    assert [(d.content, d.logprobs) for d in deltas] == [("x", [a]), ("yz", [b, c])]
    assert run.logprobs == [a, b, c]
    # With ignore_eos the eos is an ordinary token (here the last one, whose text never showed).
    deltas, run = _deltas(reference, [StepOutput(0, 10, "x", None, True, a),
                                      StepOutput(0, eos, "", "length", False, TokenLogprobs(eos, -0.1))],
                          ignore_eos=True)
    assert [(d.content, d.logprobs) for d in deltas] == [("x", [a]), ("", [TokenLogprobs(eos, -0.1)])]
    assert len(run.logprobs) == 2
