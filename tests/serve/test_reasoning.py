"""DeepSeek-R1 style <think> output comes back as reasoning_content (OpenAI) / thinking (Ollama)."""

import json

import httpx
import pytest

from tandem.serve.reasoning import ReasoningSplitter, prompt_opens_reasoning


def split(pieces: list[str], in_reasoning: bool = False) -> tuple[str, str]:
    splitter, reasoning, content = ReasoningSplitter(in_reasoning), "", ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


def every_split(text: str) -> list[list[str]]:
    """The text cut into pieces at every pair of positions, so tags straddle pieces every way."""
    cuts = [[text]] + [[text[:i], text[i:]] for i in range(1, len(text))]
    return cuts + [[text[:i], text[i:j], text[j:]] for i in range(1, len(text)) for j in range(i + 1, len(text))]


@pytest.mark.parametrize("text, in_reasoning, expected", [
    ("<think>step 1\nstep 2</think>\n\nThe answer.", False, ("step 1\nstep 2", "\n\nThe answer.")),
    ("\n <think>why</think>so", False, ("why", "so")),
    ("plain answer", False, ("", "plain answer")),
    ("<thin air", False, ("", "<thin air")),
    ("a <think>b</think>", False, ("", "a <think>b</think>")),  # a tag only counts at the start
    ("still thinking</think>answer", True, ("still thinking", "answer")),
    ("cut off while thinking</thi", True, ("cut off while thinking</thi", "")),
    ("<think>unfinished", False, ("unfinished", "")),
    ("", False, ("", "")),
])
def test_splitter_handles_tags_split_across_pieces(text, in_reasoning, expected):
    for pieces in every_split(text) if len(text) < 40 else [[text], list(text)]:
        assert split(pieces, in_reasoning) == expected, pieces


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜>")
    assert not prompt_opens_reasoning("<｜Assistant｜><think>\n\n</think>\n\n")  # thinking switched off


CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


def test_opened_think_block_streams_as_reasoning_content(thinking_server, reference):
    server, tokenizer = thinking_server
    ids = tokenizer.encode_chat(CHAT)
    assert tokenizer.decode(ids).endswith("<think>\n")
    expected = reference.generate(ids, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert "</think>" not in expected.text  # so all of it is reasoning
    body = {"model": "r1", "messages": CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["choices"][0]["message"]["reasoning_content"] == expected.text
    assert r["choices"][0]["message"]["content"] == ""

    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == expected.text
    assert "".join(d.get("content", "") for d in deltas) == ""
    assert sum("reasoning_content" in d for d in deltas) > 1

    r = httpx.post(server.url + "/api/chat", json={"model": "r1", "messages": CHAT, "stream": False,
                                                   "options": {"temperature": 0, "num_predict": 12}}, timeout=60)
    greedy = reference.generate(ids, max_new_tokens=12, temperature=0)
    assert r.json()["message"]["thinking"] == greedy.text and r.json()["message"]["content"] == ""


def test_completions_return_raw_text(thinking_server, reference):
    server, _ = thinking_server
    expected = reference.generate("<think>\nsome", max_new_tokens=6, temperature=0, ignore_eos=True)
    r = httpx.post(server.url + "/v1/completions", json={"model": "r1", "prompt": "<think>\nsome", "max_tokens": 6,
                                                         "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.json()["choices"][0]["text"] == expected.text
