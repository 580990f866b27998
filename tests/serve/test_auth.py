"""`--api-key`: Bearer auth on every route but /health and the page; the page asks for the key."""

import httpx
import pytest

from tandem.runtime.llm import LLM
from tests.serve.conftest import MAX_CONTEXT, live_server

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e '.[test]'")

KEY = "sk-test-0123456789"
WEB_APP = "http://localhost:3000"  # a separate web UI allowed with --allow-origin


@pytest.fixture(scope="module")
def keyed(model_dir):
    llm = LLM(model_dir, dtype="float32", progress=False, max_context=MAX_CONTEXT)
    with live_server(llm, port=0, api_key=KEY, model_name="tiny", allowed_origins=(WEB_APP,)) as live:
        yield live


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/metrics"),
    ("GET", "/api/tags"), ("POST", "/api/chat"), ("POST", "/api/generate"), ("GET", "/api/version"),
    ("GET", "/no/such/route"),
])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer"])
def test_routes_need_the_key(keyed, method, path, header):
    headers = {"authorization": header} if header else {}
    r = httpx.request(method, keyed.url + path, headers=headers, json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert ("missing API key" if header is None else "incorrect API key") in message
    if not path.startswith("/api/"):
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"


def test_health_and_page_are_open(keyed):
    assert httpx.get(keyed.url + "/health").json()["status"] == "ok"
    head = httpx.head(keyed.url + "/health")  # load balancers' probe (was 405)
    assert head.status_code == 200 and not head.content
    page = httpx.get(keyed.url + "/")
    assert page.status_code == 200 and "<title>tandem chat</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_the_right_key_works_with_openai_and_ollama_clients(keyed, reference):
    expected = reference.generate([{"role": "user", "content": "hi"}], max_new_tokens=4, temperature=0)
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0)
    assert out.choices[0].message.content == expected.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()
    r = httpx.post(keyed.url + "/api/chat", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                         "options": {"temperature": 0, "num_predict": 4}})
    assert r.json()["message"]["content"] == expected.text


def test_page_asks_for_the_key_then_chats(keyed):
    from tests.serve.test_page import chromium_path, sync_api, wait_for

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(keyed.url + "/")
            page.locator("#keybox.open").wait_for(timeout=10_000)
            page.fill("#api-key", KEY)
            page.click("#save-key")
            wait_for(page, "window.tandemChat.model === 'tiny'")
            page.click("#toggle-settings")
            page.fill("#max-tokens", "5")
            page.fill("#input", "hi")
            page.click("#send")
            page.locator(".msg.assistant[data-done=true]").wait_for(timeout=30_000)
            assert page.evaluate("tandemChat.messages.length") == 2 and not page.locator(".error").count()
        finally:
            browser.close()


def test_an_allowed_origin_gets_cors_and_others_do_not(keyed):
    preflight = httpx.options(keyed.url + "/v1/chat/completions", headers={
        "origin": WEB_APP, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == WEB_APP
    r = httpx.get(keyed.url + "/v1/models", headers={"origin": WEB_APP, "authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == WEB_APP
    other = httpx.get(keyed.url + "/v1/models", headers={"origin": "http://localhost:3001",
                                                          "authorization": f"Bearer {KEY}"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
    assert httpx.head(keyed.url + "/").status_code == 200
