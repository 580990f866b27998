"""The Ollama routes with httpx: NDJSON streaming (the default) and not, options, model listings."""

import json

import httpx
import pytest

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture
def http(idle):
    with httpx.Client(base_url=idle.url, timeout=60) as client:
        yield client


def ndjson_lines(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def test_chat_streams_ndjson_by_default(http, reference):
    expected = reference.generate(CHAT, max_new_tokens=10, temperature=0)
    lines = ndjson_lines(http, "/api/chat", {"model": "tiny", "messages": CHAT,
                                              "options": {"temperature": 0, "num_predict": 10}})
    *parts, last = lines
    assert len(parts) > 1 and not any(p["done"] for p in parts)
    assert "".join(p["message"]["content"] for p in parts) == expected.text
    assert all(p["message"]["role"] == "assistant" and p["model"] == "tiny" for p in parts)
    assert last["done"] is True and last["done_reason"] == expected.finish_reason
    assert last["eval_count"] == len(expected.token_ids)
    assert last["prompt_eval_count"] == len(expected.prompt_token_ids)
    assert last["total_duration"] >= last["eval_duration"] > 0 and last["prompt_eval_duration"] > 0


def test_chat_without_streaming(http, reference):
    expected = reference.generate(CHAT, max_new_tokens=8, temperature=0)
    r = http.post("/api/chat", json={"model": "tiny:latest", "messages": CHAT, "stream": False,
                                     "options": {"temperature": 0, "num_predict": 8}})
    body = r.json()
    assert r.status_code == 200 and body["done"] is True
    assert body["message"] == {"role": "assistant", "content": expected.text}
    assert body["eval_count"] == len(expected.token_ids) and isinstance(body["total_duration"], int)


def test_generate_wraps_the_prompt_in_the_template_unless_raw(http, reference):
    templated = reference.generate([{"role": "user", "content": "Hello!"}], max_new_tokens=6, temperature=0)
    raw = reference.generate("Hello!", max_new_tokens=6, temperature=0)
    options = {"temperature": 0, "num_predict": 6}
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "Hello!", "stream": False, "options": options})
    assert r.json()["response"] == templated.text
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "Hello!", "raw": True, "stream": False,
                                         "options": options})
    assert r.json()["response"] == raw.text and r.json()["prompt_eval_count"] == len(raw.prompt_token_ids)
    lines = ndjson_lines(http, "/api/generate", {"model": "tiny", "prompt": "Hello!", "raw": True, "options": options})
    assert "".join(line["response"] for line in lines) == raw.text and lines[-1]["done"]


def test_generate_system_prompt_goes_into_the_template(http, reference):
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"}]
    expected = reference.generate(messages, max_new_tokens=6, temperature=0)
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "Hello!", "system": "Answer in French.",
                                         "stream": False, "options": {"temperature": 0, "num_predict": 6}})
    assert r.json()["prompt_eval_count"] == len(expected.prompt_token_ids)
    assert r.json()["response"] == expected.text


def test_options_reach_the_sampler(http, reference):
    full = reference.generate(CHAT, max_new_tokens=16, temperature=0).text
    stop = full[3:6]
    r = http.post("/api/chat", json={"model": "tiny", "messages": CHAT, "stream": False,
                                     "options": {"temperature": 0, "num_predict": 16, "stop": [stop]}})
    assert r.json()["message"]["content"] == full[: full.index(stop)] and r.json()["done_reason"] == "stop"
    seeded = reference.generate(CHAT, max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=42,
                                repetition_penalty=1.3)
    options = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 42, "repeat_penalty": 1.3, "num_predict": 12,
               "num_ctx": 4096, "unknown_option": 1}
    r = http.post("/api/chat", json={"model": "tiny", "messages": CHAT, "stream": False, "options": options})
    assert r.json()["message"]["content"] == seeded.text


def test_empty_requests_answer_like_a_model_load(http):
    for path, body in (("/api/generate", {"model": "tiny"}), ("/api/chat", {"model": "tiny", "messages": []})):
        r = http.post(path, json=body)
        assert r.status_code == 200 and r.json()["done"] is True and r.json()["done_reason"] == "load"


def test_model_listings(http, server):
    tags = http.get("/api/tags").json()["models"]
    assert [m["name"] for m in tags] == ["tiny"] and tags[0]["size"] > 0 and tags[0]["details"]["family"] == \
        "deepseek_v3"
    show = http.post("/api/show", json={"model": "tiny"}).json()
    assert show["model_info"]["general.context_length"] == server.app.state.model.max_context
    assert "thinking" in show["capabilities"] and "<｜Assistant｜>" in show["template"]
    assert http.post("/api/show", json={"name": "tiny"}).status_code == 200  # older clients
    assert http.get("/api/ps").json()["models"][0]["name"] == "tiny"
    assert http.get("/api/version").json()["version"].count(".") == 2


def test_curl_style_form_encoded_json_is_accepted(http, reference):
    # `curl -d '{...}'` (as in Ollama's docs) sends application/x-www-form-urlencoded.
    expected = reference.generate("Hi", max_new_tokens=3, temperature=0)
    body = json.dumps({"model": "tiny", "prompt": "Hi", "raw": True, "stream": False,
                       "options": {"temperature": 0, "num_predict": 3}})
    r = http.post("/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["response"] == expected.text


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/chat", {"model": "llama3", "messages": CHAT}, 404, "not served here"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/api/chat", {"model": "tiny", "messages": CHAT, "options": {"num_predict": 0}}, 400, "num_predict"),
    ("/api/chat", {"model": "tiny", "messages": CHAT, "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "format": "xml"}, 400, "format"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "format": {"type": "bogus"}}, 400, "bogus"),
    ("/api/generate", {"prompt": "x"}, 400, "model"),
    ("/api/show", {"model": "other"}, 404, "not served here"),
])
def test_errors_are_ollama_style(http, path, body, status, message):
    r = http.post(path, json=body)
    assert r.status_code == status and isinstance(r.json()["error"], str) and message in r.json()["error"]
