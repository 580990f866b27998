"""The OpenAI routes through the official `openai` client: greedy output equals LLM.generate."""

import threading

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e '.[test]'")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a mixture of experts?"}]


@pytest.fixture
def client(idle):
    return openai.OpenAI(base_url=idle.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_greedy_equals_llm_generate(client, reference):
    expected = reference.generate(CHAT, max_new_tokens=12, temperature=0)
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "tiny"
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream_equals_llm_generate_and_reports_usage(client, reference):
    expected = reference.generate(CHAT, max_new_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected.text and sum(bool(p) for p in pieces) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    *body, last = chunks
    assert last.choices == [] and all(c.usage is None for c in body)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(expected.prompt_token_ids),
                                                                        len(expected.token_ids))


def test_chat_stream_without_include_usage_sends_no_usage(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0,
                                                 stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_completions_equal_llm_generate(client, reference):
    expected = reference.generate("The quick brown fox", max_new_tokens=9, temperature=0)
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=9, temperature=0)
    assert out.choices[0].text == expected.text and out.object == "text_completion"
    assert out.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)


def test_completions_take_token_ids(client, reference):
    ids = reference.tokenizer.encode("hello world")
    expected = reference.generate(ids, max_new_tokens=5, temperature=0)
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0).choices[0].text == \
        expected.text


@pytest.mark.parametrize("stop_as_list", [False, True])
def test_stop_strings_cut_the_answer(client, reference, stop_as_list):
    full = reference.generate(CHAT, max_new_tokens=16, temperature=0).text
    stop = full[4:7]
    assert stop and stop not in full[:4]
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0,
                                         stop=[stop, "never appears"] if stop_as_list else stop)
    assert out.choices[0].message.content == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_max_completion_tokens_wins_over_max_tokens(client):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=9, max_completion_tokens=4,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("sampling", [
    dict(temperature=1.0, seed=7),
    dict(temperature=0.8, top_p=0.5, seed=3),
    dict(temperature=1.0, top_k=5, min_p=0.05, seed=11),
    dict(temperature=0, presence_penalty=1.5, frequency_penalty=1.0),
])
def test_sampling_options_reach_the_sampler(client, reference, sampling):
    # The server must pass each option on: its tokens equal LLM.generate's with the same options,
    # which differ from greedy / other seeds (checked below so the comparison means something).
    sampling = dict(sampling)
    extra = {k: sampling.pop(k) for k in ("top_k", "min_p") if k in sampling}
    expected = reference.generate(CHAT, max_new_tokens=24, ignore_eos=True, **sampling, **extra)
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, extra_body={"ignore_eos": True,
                                         **extra}, **sampling)
    assert out.choices[0].message.content == expected.text
    plain = reference.generate(CHAT, max_new_tokens=24, ignore_eos=True, temperature=0)  # repeats tokens
    assert expected.text != plain.text


def test_concurrent_requests_run_together_and_match(client, reference, server):
    prompts = ["one two three", "a", "the model says"]
    expected = [reference.generate(p, max_new_tokens=48, temperature=0, ignore_eos=True).text for p in prompts]
    results: dict[int, str] = {}
    running_seen = []

    def ask(i: int) -> None:
        out = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=48, temperature=0,
                                        extra_body={"ignore_eos": True})
        results[i] = out.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        running_seen.append(server.app.state.engine.running + server.app.state.engine.queue_depth)
        threads[0].join(0.005)
    assert [results[i] for i in range(len(prompts))] == expected
    assert max(running_seen) >= 2  # they overlapped in the engine rather than running one after another


def test_metrics_count_requests_and_tokens(idle):
    before = httpx.get(idle.url + "/metrics").text
    generated = _sample(before, "tandem_generated_tokens_total")
    chats = _sample(before, 'tandem_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}')
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    assert httpx.post(idle.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    after = httpx.get(idle.url + "/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    assert _sample(after.text, "tandem_generated_tokens_total") == generated + 5
    assert _sample(after.text, 'tandem_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}') \
        == chats + 1
    assert _sample(after.text, "tandem_decode_tokens_per_second") > 0
    assert _sample(after.text, "tandem_queue_depth") == 0 and "# TYPE tandem_queue_depth gauge" in after.text


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_bare_engine_can_be_served(model_dir, reference):
    from tandem.runtime.llm import LLM
    from tests.serve.conftest import live_server

    engine = LLM(model_dir, dtype="float32", progress=False, max_context=64).engine
    expected = reference.generate("hello", max_new_tokens=4, temperature=0)
    with live_server(engine, port=0) as live:
        assert live.name == "tandem"
        r = httpx.post(live.url + "/v1/completions", json={"model": "tandem", "prompt": "hello", "max_tokens": 4},
                       timeout=30)
    assert r.json()["choices"][0]["text"] == expected.text  # no generation_config here: greedy by default


def test_logit_bias_steers_the_tokens(idle, reference):
    chat = [{"role": "user", "content": "hi"}]
    ids = reference.tokenizer.encode_chat(chat)
    greedy = reference.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True)
    forced = (greedy.token_ids[0] + 1) % reference.tokenizer.vocab_size
    body = {"model": "tiny", "messages": chat, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    r = httpx.post(idle.url + "/v1/chat/completions", json={**body, "logit_bias": {str(forced): 100}}, timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == reference.tokenizer.decode([forced] * 4)
    banned = reference.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True,
                                logit_bias={greedy.token_ids[0]: -100})
    assert banned.token_ids[0] != greedy.token_ids[0]
    r = httpx.post(idle.url + "/v1/chat/completions", json={**body, "logit_bias": {str(greedy.token_ids[0]): -100}},
                   timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == banned.text
