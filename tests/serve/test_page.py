"""The web chat page in headless Chromium: type a message, watch the answer stream in, stop one.

Needs Playwright (pip) and a system Chromium (Debian: `apt-get install chromium`); no browser is
downloaded. Skips with the reason when either is missing.
"""

import shutil
import time

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on PATH: apt-get install -y chromium")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, idle):
    context = browser.new_context()
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(idle.url + "/")
    wait_for(page, "window.tandemChat && window.tandemChat.model === 'tiny'")
    yield page
    assert not errors, errors
    assert all(url.startswith(idle.url) for url in requests), requests  # nothing from the internet
    context.close()


def wait_for(page, expression: str, timeout: float = 30.0) -> None:
    # Polls from Python: Playwright's wait_for_function evaluates strings, which the page's CSP forbids.
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.02)


def settings(page, temperature: str, max_tokens: str) -> None:
    page.click("#toggle-settings")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def test_typed_message_gets_a_streamed_answer(page, reference):
    expected = reference.generate([{"role": "user", "content": "Hello there!"}], max_new_tokens=24, temperature=0)
    settings(page, "0", "24")
    page.fill("#input", "Hello there!")
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").last
    answer.and_(page.locator("[data-done=true]")).wait_for(timeout=30_000)
    assert page.evaluate("tandemChat.messages") == [{"role": "user", "content": "Hello there!"},
                                                    {"role": "assistant", "content": expected.text}]
    assert int(answer.get_attribute("data-chunks")) > 1  # arrived in pieces, not at once
    assert "tok/s" in answer.locator(".stats").inner_text()
    assert page.locator(".msg.user").last.inner_text().endswith("Hello there!")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_stop_button_aborts_the_generation(page, server):
    aborted, tokens = server.metrics.finished["abort"], server.app.state.engine.tokens_generated
    settings(page, "0", "500")
    page.fill("#input", "Tell me a long story.")  # greedy: no eos for 490+ tokens
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    wait_for(page, "Number(document.querySelector('.msg.assistant:last-child').dataset.chunks || 0) > 2")
    page.click("#stop")
    answer.and_(page.locator("[data-done=true]")).wait_for(timeout=10_000)
    assert "stopped" in answer.locator(".stats").inner_text()
    assert server.wait_idle(20) and server.metrics.finished["abort"] == aborted + 1
    assert server.app.state.engine.tokens_generated - tokens < 250  # not the 500 asked for


def test_markdown_is_rendered_without_letting_html_through(page):
    html = page.evaluate("""renderMarkdown(
        '**bold** and *it* with `a<b>` and [link](https://example.com/?a=1&b=2)\\n' +
        '- one\\n- two\\n\\n1. first\\n\\n<img src=x onerror="alert(1)"> [bad](javascript:alert(1))\\n' +
        '```python\\nprint("<script>")\\n```\\nafter')""")
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html and "<code>a&lt;b&gt;</code>" in html
    assert '<a href="https://example.com/?a=1&amp;b=2" target="_blank" rel="noopener noreferrer">link</a>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li></ol>" in html
    assert '<pre><code>print(&quot;&lt;script&gt;&quot;)</code></pre>' in html
    assert "<img" not in html and "&lt;img" in html and 'href="javascript' not in html


def test_reasoning_is_shown_collapsed_beside_the_answer(browser, thinking_server, reference):
    server, tokenizer = thinking_server
    expected = reference.generate(tokenizer.encode_chat([{"role": "user", "content": "Why?"}]), max_new_tokens=8,
                                  temperature=0)
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        wait_for(page, "window.tandemChat && window.tandemChat.model === 'r1'")
        settings(page, "0", "8")
        page.fill("#input", "Why?")
        page.click("#send")
        page.locator(".msg.assistant[data-done=true]").wait_for(timeout=30_000)
        details = page.locator(".msg.assistant details.reasoning")
        assert details.is_visible() and details.get_attribute("open") is None  # shown, collapsed
        assert page.locator(".msg.assistant .thoughts").text_content() == expected.text
        assert page.locator(".msg.assistant .content").inner_text() == ""
    finally:
        page.close()
