"""Timing fields: OpenAI responses keep the standard `usage` and add llama.cpp-style `timings`
(full response, last stream chunk); Ollama's final object has real counts and nanosecond durations.
Checked for presence, sign, units and agreement with the token counts, never for speed."""

import json
import time

import httpx
import pytest

CHAT = [{"role": "user", "content": "Tell me about the sea."}]
TIMINGS = {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"}
USAGE = {"prompt_tokens", "completion_tokens", "total_tokens"}


@pytest.fixture
def http(idle):
    with httpx.Client(base_url=idle.url, timeout=60) as client:
        yield client


def check_timings(timings: dict, usage: dict, elapsed_s: float) -> None:
    assert set(timings) == TIMINGS and set(usage) == USAGE  # usage stays exactly OpenAI's
    assert timings["prompt_n"] == usage["prompt_tokens"] > 0
    assert timings["predicted_n"] == usage["completion_tokens"] > 1
    for kind in ("prompt", "predicted"):
        ms, rate = timings[f"{kind}_ms"], timings[f"{kind}_per_second"]
        assert ms > 0 and rate > 0
        assert rate == pytest.approx(timings[f"{kind}_n"] / ms * 1e3, rel=1e-2)
    # Both spans lie inside the client's own view of the request: milliseconds, not seconds or ns.
    assert timings["prompt_ms"] + timings["predicted_ms"] <= elapsed_s * 1e3


def sse_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_chat_response_has_timings_beside_usage(http):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    out = http.post("/v1/chat/completions", json=body).json()
    check_timings(out["timings"], out["usage"], time.perf_counter() - start)
    assert out["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("path, prompt", [("/v1/chat/completions", {"messages": CHAT}),
                                          ("/v1/completions", {"prompt": "The sea is"})])
@pytest.mark.parametrize("include_usage", [False, True])
def test_last_stream_chunk_has_timings(http, path, prompt, include_usage):
    body = {"model": "tiny", **prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": include_usage}}
    start = time.perf_counter()
    *chunks, last = sse_events(http, path, body)
    elapsed = time.perf_counter() - start
    assert not any("timings" in c for c in chunks)
    if include_usage:
        assert last["choices"] == [] and chunks[-1]["choices"][0]["finish_reason"] == "length"
        check_timings(last["timings"], last["usage"], elapsed)
    else:  # no usage chunk: the finish chunk is last; its counts must still agree with what streamed
        assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last
        assert last["timings"]["predicted_n"] == 5


def test_openai_client_still_parses_responses_with_timings(idle):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=idle.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4 and out.model_extra["timings"]["predicted_n"] == 4
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].model_extra["timings"]["prompt_n"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_counts_and_durations_are_real(http, stream):
    body = {"model": "tiny", "prompt": "The sea is", "raw": True, "stream": stream,
            "options": {"temperature": 0, "num_predict": 6}}
    start = time.perf_counter()
    with http.stream("POST", "/api/generate", json=body) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    elapsed_ns = (time.perf_counter() - start) * 1e9
    *parts, final = lines
    assert final["done"] is True and (bool(parts) if stream else not parts)
    n = final["eval_count"]
    assert 1 <= n <= 6 and (n == 6 or final["done_reason"] == "stop")
    assert final["prompt_eval_count"] > 0
    for key in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0, key
    # Nanoseconds: the spans add up to the total, which lies inside the client's own measurement.
    assert final["prompt_eval_duration"] + final["eval_duration"] <= final["total_duration"] <= elapsed_ns
