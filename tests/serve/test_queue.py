"""Queue limit: with --max-queue N, request N+1 waiting for its first token gets 429 + Retry-After."""

import threading
import time

import httpx
import pytest

from tests.serve.conftest import engine_held, queue_limited

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def small_queue(model_dir):
    with queue_limited(model_dir, 1) as live:
        yield live


def test_full_queue_gets_429_with_retry_after(small_queue):
    engine = small_queue.app.state.engine
    first: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: first.append(
        httpx.post(small_queue.url + "/v1/chat/completions", json=BODY, timeout=60)))
    with engine_held(small_queue):
        waiter.start()
        deadline = time.monotonic() + 10
        while engine._pending < 1:  # the first request is submitted and waits for its first token
            assert time.monotonic() < deadline, "the first request never reached the engine"
            time.sleep(0.01)
        refused = (("/v1/chat/completions", BODY), ("/v1/chat/completions", {**BODY, "stream": True}),
                   ("/api/generate", {"model": "tiny", "prompt": "x"}))
        for path, body in refused:  # a stream is refused before it starts, so it gets a status too
            r = httpx.post(small_queue.url + path, json=body, timeout=10)
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) >= 1
            if path.startswith("/v1"):
                error = r.json()["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
                assert "--max-queue 1" in error["message"]
            else:
                assert "--max-queue 1" in r.json()["error"]
    waiter.join(60)
    assert first and first[0].status_code == 200, first and first[0].text
    assert small_queue.wait_idle()
    r = httpx.post(small_queue.url + "/v1/chat/completions", json=BODY, timeout=60)  # room again
    assert r.status_code == 200 and engine._pending == 0
    metrics = httpx.get(small_queue.url + "/metrics").text  # refusals are counted under their route
    assert 'tandem_http_requests_total{method="POST",route="/v1/chat/completions",status="429"} 2' in metrics
    assert 'tandem_http_requests_total{method="POST",route="/api/generate",status="429"} 1' in metrics
    assert 'tandem_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 2' in metrics
