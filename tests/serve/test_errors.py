"""Bad input gets the right 4xx with an OpenAI-style body, and the server keeps serving after it."""

import asyncio
import json

import httpx
import pytest

from tests.serve.conftest import BODY_LIMIT, MAX_CONTEXT

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def with_(**changes) -> dict:
    return {**GOOD, **changes}


@pytest.fixture
def http(idle):
    with httpx.Client(base_url=idle.url, timeout=60) as client:
        yield client


def assert_openai_error(r: httpx.Response, status: int, message: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("path, body, status, message, param", [
    ("/v1/chat/completions", "{not json", 400, "not valid JSON", None),
    ("/v1/chat/completions", "[1, 2]", 400, "must be a JSON object", None),
    ("/v1/chat/completions", with_(messages="hello"), 400, "messages", "messages"),
    ("/v1/chat/completions", with_(temperature="hot"), 400, "temperature", "temperature"),
    ("/v1/chat/completions", with_(stream="yes"), 400, "stream", "stream"),
    ("/v1/chat/completions", with_(model="gpt-4o"), 404, "not served here", "model"),
    ("/v1/chat/completions", with_(max_tokens=-5), 400, "greater than or equal to 1", "max_tokens"),
    ("/v1/chat/completions", with_(max_completion_tokens=0), 400, "max_completion_tokens", "max_completion_tokens"),
    ("/v1/chat/completions", with_(messages=[{"role": "wizard", "content": "x"}]), 400, "role", "messages.0.role"),
    ("/v1/chat/completions", with_(messages=[{"role": "tool", "content": "x"}]), 400, "Unsupported role", None),
    ("/v1/chat/completions", with_(messages=[]), 400, "at least 1", "messages"),
    ("/v1/chat/completions", with_(messages=[{"role": "user", "content": "word " * 600}]), 400,
     f"context window is {MAX_CONTEXT}", None),
    ("/v1/chat/completions", with_(top_p=0), 400, "top_p", None),
    ("/v1/chat/completions", with_(seed=-1), 400, "seed", None),
    ("/v1/chat/completions", with_(stop=[""]), 400, "stop", None),
    ("/v1/chat/completions", with_(n=129), 400, "less than or equal to 128", "n"),
    ("/v1/chat/completions", with_(n=0), 400, "greater than or equal to 1", "n"),
    ("/v1/chat/completions", with_(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tool", "tools"),
    ("/v1/chat/completions", with_(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "image_url", "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "empty", None),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "several prompts", "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 10**9]}, 400, "token ids must be in", None),
    ("/v1/completions", {"model": "tiny", "prompt": {"text": "x"}}, 400, "prompt", None),
    ("/v1/models/gpt-4o", None, 404, "not served here", "model"),
    ("/v1/nowhere", None, 404, "no route", None),
    # Found by fuzzing: each of these was a 500 (or silently ignored).
    pytest.param("/v1/chat/completions", "[" * 3000, 400, "nests JSON too deeply", None, id="deep-nesting"),
    pytest.param("/v1/chat/completions", '{"max_tokens": 1' + "0" * 5000 + "}", 400, "not valid JSON", None,
                 id="5000-digit-number"),
    ("/v1/completions", '{"model": "tiny", "prompt": "\\udfff", "max_tokens": 2}', 400, "lone UTF-16 surrogate", None),
    ("/v1/chat/completions", with_(chat_template_kwargs={"add_generation_prompt": False}), 400, "cannot set", None),
    ("/v1/chat/completions", with_(chat_template_kwargs={"namespace": 1}), 400, "cannot set", None),
    ("/v1/chat/completions", with_(chat_template_kwargs={"messages": []}), 400, "cannot set", None),
    ("/v1/chat/completions", with_(chat_template_kwargs={"self": 1}), 400, "cannot set", None),
    ("/v1/chat/completions", with_(repetition_penalty=1e-300), 400, "repetition_penalty", None),
    ("/v1/chat/completions", with_(stop=[f"s{i}" for i in range(17)]), 400, "at most 16", None),
    ("/v1/chat/completions", with_(response_format={"type": "xml"}), 400, "response_format", "response_format"),
    ("/v1/chat/completions", with_(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}),
     400, "bogus", "response_format"),
    ("/v1/chat/completions", with_(response_format={"type": "json_schema", "json_schema": []}), 400, "json_schema",
     "response_format"),
    ("/v1/chat/completions", with_(logit_bias={"one": 5}), 400, "logit_bias", "logit_bias"),
    ("/v1/chat/completions", with_(logit_bias={"5": 1, "05": 2}), 400, "twice", "logit_bias"),
    pytest.param("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
                 '"logit_bias": {"1": 1' + "0" * 400 + '}}', 400, "logit_bias", None, id="bias-10**400"),
    ("/v1/chat/completions", with_(logit_bias={"1": 500}), 400, "logit_bias", None),
    ("/v1/chat/completions", with_(logit_bias={"100000": 5}), 400, "logit_bias token ids", None),
    ("/v1/chat/completions", with_(top_logprobs=5), 400, "top_logprobs", "top_logprobs"),
    ("/v1/chat/completions", with_(functions=[{"name": "f"}]), 400, "as `tools`", "functions"),
    ("/v1/chat/completions", with_(stream_options={"include_usage": True}), 400, "stream: true", "stream_options"),
    ("/v1/chat/completions", with_(max_tokens=True), 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of", "best_of"),
    ("/v1/completions", {"model": "tiny", "prompt": [True, False]}, 400, "prompt", None),
])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(http, path, body, status, message, param):
    if body is None:
        r = http.get(path)
    else:
        r = http.post(path, content=body if isinstance(body, str) else json.dumps(body))
    assert_openai_error(r, status, message, param)
    ok = http.post("/v1/chat/completions", json=GOOD)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_prompt_far_over_the_context_is_refused_before_tokenizing(http, server, monkeypatch):
    """More characters than any tokenizer fits in the context window: refused without running the
    tokenizer, which would hold the interpreter (and every other request) for seconds on megabytes."""
    from tandem.runtime.tokenizer import MAX_CHARS_PER_TOKEN

    calls = []
    tokenizer = server.app.state.model.tokenizer
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(1) or [])
    long = "x" * (MAX_CHARS_PER_TOKEN * MAX_CONTEXT + 1)
    assert_openai_error(http.post("/v1/completions", json={"model": "tiny", "prompt": long}), 400, "characters")
    assert_openai_error(http.post("/v1/chat/completions", json=with_(messages=[{"role": "user", "content": long}])),
                        400, "characters")
    assert calls == []


def test_too_long_prompt_in_a_stream_fails_before_streaming(http):
    r = http.post("/v1/chat/completions", json=with_(stream=True, messages=[{"role": "user", "content": "x " * 900}]))
    assert_openai_error(r, 400, "context window")


def test_huge_bodies_are_refused(http):
    big = json.dumps(with_(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]))
    assert_openai_error(http.post("/v1/chat/completions", content=big), 413, "larger than")

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b" " * 4096

    assert_openai_error(http.post("/v1/chat/completions", content=chunks()), 413, "larger than")
    assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_foreign_hosts_and_cross_site_pages_are_refused(http, server):
    assert_openai_error(http.get("/v1/models", headers={"host": "attacker.example:80"}), 403, "Host")
    r = http.post("/v1/chat/completions", json=GOOD, headers={"origin": "http://attacker.example"})
    assert_openai_error(r, 403, "web pages")
    same_origin = server.url  # the server's own page is allowed
    assert http.post("/v1/chat/completions", json=GOOD, headers={"origin": same_origin}).status_code == 200


def test_malformed_host_and_origin_headers_are_refused_not_500(http):
    assert_openai_error(http.get("/v1/models", headers={"host": "[::1"}), 403, "Host")
    assert_openai_error(http.get("/v1/models", headers={"origin": "http://["}), 403, "web pages")


def test_a_tiny_temperature_samples_greedily_and_spares_the_batch(http):
    """temperature 1e-300 once overflowed the logits into NaN probabilities and failed every
    request of the engine's step; now it is greedy (as temperature 0) and answers 200."""
    greedy = http.post("/v1/chat/completions", json=with_(max_tokens=4)).json()
    tiny = http.post("/v1/chat/completions", json=with_(max_tokens=4, temperature=1e-300))
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy["choices"][0]["message"]


def test_prompts_are_built_off_the_event_loop(http, server, monkeypatch):
    """A long conversation's template and tokenization run on a worker thread, so they do not
    stall other requests' streams (a 4 MB message held /health for 3.6 s)."""
    model = server.app.state.model
    original, on_loop = model.chat_prompt, []

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "chat_prompt", spy)
    assert http.post("/v1/chat/completions", json=GOOD).status_code == 200
    assert on_loop == [False]


def test_made_up_methods_share_one_metrics_label(http, server):
    for method in ("XABC", "XDEF"):
        assert http.request(method, "/v1/models").status_code == 405
    methods = {m for m, _, _ in server.metrics.requests}
    assert "OTHER" in methods and not methods & {"XABC", "XDEF"}


def test_unexpected_errors_are_500_json_and_the_server_survives(http, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.app.state.model, "chat_prompt", broken)
    assert_openai_error(http.post("/v1/chat/completions", json=GOOD), 500, "internal server error")
    monkeypatch.undo()
    assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_a_failing_engine_step_fails_its_requests_only(http, server):
    engine = server.app.state.engine

    def break_step(e):
        def boom():
            raise RuntimeError("kernel exploded")

        e.step = boom

    engine.call(break_step).result(timeout=10)
    try:
        r = http.post("/v1/chat/completions", json=with_(stream=True))
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and "internal server error" in json.loads(events[-2])["error"]["message"]
        assert events[-1] == "[DONE]"
    finally:
        engine.call(lambda e: e.__dict__.pop("step")).result(timeout=10)
    assert server.wait_idle(5)
    assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_disconnect_mid_stream_aborts_and_frees_kv_blocks(http, server):
    aborted, tokens = server.metrics.finished["abort"], server.app.state.engine.tokens_generated
    body = with_(stream=True, max_tokens=MAX_CONTEXT, ignore_eos=True)
    events = []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            events += [line] if line.startswith("data: ") else []
            if len(events) == 3:
                break  # leaving the block closes the connection mid-stream
    assert len(events) == 3
    assert server.wait_idle(20)
    # ~MAX_CONTEXT tokens if the engine had carried on for nobody; a handful when aborted.
    assert server.app.state.engine.tokens_generated - tokens < MAX_CONTEXT // 2
    assert server.metrics.finished["abort"] == aborted + 1
    busy, free, total = server.engine_state()
    assert not busy and free == total
    assert http.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_disconnect_while_waiting_for_a_full_answer_aborts(server):
    aborted, tokens = server.metrics.finished["abort"], server.app.state.engine.tokens_generated
    body = with_(max_tokens=MAX_CONTEXT, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.2))
    assert server.wait_idle(20)
    assert server.app.state.engine.tokens_generated - tokens < MAX_CONTEXT // 2
    assert server.metrics.finished["abort"] == aborted + 1


def test_ollama_stream_disconnect_aborts(server):
    aborted, tokens = server.metrics.finished["abort"], server.app.state.engine.tokens_generated
    long = [{"role": "user", "content": "Tell me a long story."}]  # greedy: no eos for 490+ tokens
    body = {"model": "tiny", "messages": long, "options": {"num_predict": MAX_CONTEXT, "temperature": 0}}
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=60) as r:
        assert json.loads(next(r.iter_lines()))["done"] is False
    assert server.wait_idle(20)
    assert server.app.state.engine.tokens_generated - tokens < MAX_CONTEXT // 2
    assert server.metrics.finished["abort"] == aborted + 1
