"""Structured output through the APIs: OpenAI response_format, Ollama format."""

import json

import httpx
import pytest

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
          "minimum": 1, "maximum": 9}}, "required": ["city", "days"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Plan a trip"}]


def follows_schema(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"city", "days"} and value["city"] in ("Paris", "Rome") and 1 <= value["days"] <= 9


@pytest.mark.parametrize("stream", [False, True])
def test_openai_json_schema(idle, stream):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 60, "temperature": 0.8, "seed": 3, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}}
    if not stream:
        r = httpx.post(idle.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert r["choices"][0]["finish_reason"] == "stop" and follows_schema(r["choices"][0]["message"]["content"])
        return
    with httpx.stream("POST", idle.url + "/v1/chat/completions", json=body, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert follows_schema("".join(e["choices"][0]["delta"].get("content") or "" for e in events))


def test_openai_json_object_and_completions(idle):
    r = httpx.post(idle.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "JSON:", "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}}).json()
    assert follows_schema(r["choices"][0]["text"])
    # Any object: a weak model may run out of tokens inside it, so only the start is certain.
    r = httpx.post(idle.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": ASK, "max_tokens": 8, "temperature": 0, "response_format": {"type": "json_object"}})
    assert r.json()["choices"][0]["message"]["content"].startswith("{")


def test_ollama_format(idle):
    r = httpx.post(idle.url + "/api/chat", timeout=60, json={
        "model": "tiny", "messages": ASK, "stream": False, "format": SCHEMA, "options": {"num_predict": 60}}).json()
    assert follows_schema(r["message"]["content"]) and r["done_reason"] == "stop"
    r = httpx.post(idle.url + "/api/generate", timeout=60, json={
        "model": "tiny", "prompt": "x", "stream": False, "format": "json", "options": {"num_predict": 6}}).json()
    assert r["response"].startswith("{")


def test_a_template_that_opens_think_refuses_structured_output(thinking_server):
    server, _ = thinking_server
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "r1", "messages": ASK, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "<think>" in r.json()["error"]["message"]


def test_grammars_compile_on_a_worker_thread_not_the_engines(idle, monkeypatch):
    """Compiling a schema can take a second; on the engine's thread it would stall every stream."""
    import threading

    import llguidance

    real, threads = llguidance.LLMatcher, []

    class Recording:  # LLMatcher, noting the thread each compile runs on
        grammar_from_json_schema = staticmethod(real.grammar_from_json_schema)
        validate_grammar = staticmethod(real.validate_grammar)

        def __new__(cls, *args, **kwargs):
            threads.append(threading.current_thread().name)
            return real(*args, **kwargs)

    monkeypatch.setattr(llguidance, "LLMatcher", Recording)
    schema = {"type": "object", "properties": {"seen": {"enum": ["once"]}}, "required": ["seen"],
              "additionalProperties": False}
    body = {"model": "tiny", "messages": ASK, "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}
    for _ in range(2):  # the second request copies the compiled start state
        r = httpx.post(idle.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert json.loads(r["choices"][0]["message"]["content"]) == {"seen": "once"}
    assert len(threads) == 1 and threads[0] != "tandem-engine", threads
