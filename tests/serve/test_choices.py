"""OpenAI's `n`: n generations side by side, one choice each, through the official client and raw SSE.

Seeded choice i samples as one request with seed + i would; greedy choices are the same answer;
usage counts the prompt once; a stream names each chunk's choice; a refusal or a client gone takes
every choice's generation with it."""

import json
import threading
import time

import httpx
import pytest

from tests.serve.conftest import MAX_CONTEXT, engine_held, queue_limited

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e '.[test]'")

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def client(idle):
    return openai.OpenAI(base_url=idle.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_greedy_choices_are_the_same_answer(client, reference):
    expected = reference.generate(CHAT, max_new_tokens=8, temperature=0)
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.message.content == expected.text and c.finish_reason == expected.finish_reason for c in out.choices)
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)  # once, not once per choice
    assert out.usage.completion_tokens == 3 * len(expected.token_ids)


def test_seeded_choice_i_samples_with_seed_plus_i(client, reference):
    expected = [reference.generate(CHAT, max_new_tokens=16, temperature=1.0, seed=7 + i, ignore_eos=True).text
                for i in range(3)]
    assert len(set(expected)) > 1  # the seeds give different answers, so the order below means something
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=1.0, seed=7, n=3,
                                         extra_body={"ignore_eos": True})
    assert [c.message.content for c in out.choices] == expected
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=1.0, seed=7, n=3,
                                           extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == expected


def test_stream_names_each_choice_and_finishes_each_once(client, reference):
    expected = [reference.generate("count: one two", max_new_tokens=12, temperature=1.0, seed=3 + i,
                                   ignore_eos=True).text for i in range(2)]
    chunks = list(client.completions.create(model="tiny", prompt="count: one two", max_tokens=12, temperature=1.0,
                                            seed=3, n=2, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert [texts[0], texts[1]] == expected
    assert finishes == {0: ["length"], 1: ["length"]}
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 24 and all(c.usage is None for c in body)


def test_chat_stream_opens_every_choice(idle):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 0, "n": 2, "stream": True}
    with httpx.stream("POST", idle.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:2]] == ["assistant", "assistant"]
    assert {c["choices"][0]["index"] for c in chunks[:2]} == {0, 1}
    assert "timings" in chunks[-1] and chunks[-1]["timings"]["predicted_n"] == 8


def test_logprobs_per_choice(client):
    args = dict(model="tiny", prompt="a b c", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    one = client.completions.create(**args).choices[0].logprobs
    out = client.completions.create(**args, n=2)
    for choice in out.choices:  # each choice's own formatter: its offsets start at its own text
        assert choice.logprobs.tokens == one.tokens and choice.logprobs.text_offset == one.text_offset
        assert choice.logprobs.token_logprobs == pytest.approx(one.token_logprobs, abs=1e-5)


def test_a_client_gone_mid_stream_stops_every_choice(idle):
    aborted, tokens = idle.metrics.finished["abort"], idle.app.state.engine.tokens_generated
    body = {"model": "tiny", "prompt": "x", "max_tokens": MAX_CONTEXT - 8, "temperature": 0, "n": 3, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", idle.url + "/v1/completions", json=body, timeout=60) as r:
        seen = set()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.update(c["index"] for c in json.loads(line[6:])["choices"])
            if seen == {0, 1, 2}:
                break  # leaves with all three generating
    assert idle.wait_idle(20)
    # ~3 x MAX_CONTEXT tokens if the choices had carried on for nobody; a handful each when aborted.
    assert idle.app.state.engine.tokens_generated - tokens < MAX_CONTEXT // 2
    assert idle.metrics.finished["abort"] == aborted + 3


def test_a_client_gone_before_the_answer_stops_every_choice(idle):
    aborted, tokens = idle.metrics.finished["abort"], idle.app.state.engine.tokens_generated
    body = {"model": "tiny", "messages": CHAT, "max_tokens": MAX_CONTEXT - 16, "n": 2, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(idle.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.2))
    assert idle.wait_idle(20)
    assert idle.app.state.engine.tokens_generated - tokens < MAX_CONTEXT // 2
    assert idle.metrics.finished["abort"] == aborted + 2


@pytest.fixture(scope="module")
def small_queue(model_dir):
    with queue_limited(model_dir, 3) as live:
        yield live


def test_choices_beyond_the_queue_refuse_the_request_whole(small_queue):
    engine = small_queue.app.state.engine
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "temperature": 0}
    r = httpx.post(small_queue.url + "/v1/chat/completions", json={**body, "n": 4}, timeout=10)
    assert r.status_code == 400 and "--max-queue 3" in r.json()["error"]["message"], r.text  # never fits: no 429
    other: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: other.append(
        httpx.post(small_queue.url + "/v1/chat/completions", json=body, timeout=60)))
    with engine_held(small_queue):
        waiter.start()  # takes one place in the queue, so 3 choices do not fit now
        deadline = time.monotonic() + 10
        while engine._pending < 1:
            assert time.monotonic() < deadline, "the other request never reached the engine"
            time.sleep(0.01)
        r = httpx.post(small_queue.url + "/v1/chat/completions", json={**body, "n": 3}, timeout=10)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        while engine._pending > 1:  # the choices taken before the refusal are withdrawn
            assert time.monotonic() < deadline, f"{engine._pending - 1} choices of a refused request still queued"
            time.sleep(0.01)
    waiter.join(60)
    assert other and other[0].status_code == 200
    assert small_queue.wait_idle()
    r = httpx.post(small_queue.url + "/v1/chat/completions", json={**body, "n": 3}, timeout=60)  # room again
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
