"""Tool calls parsed out of model output, for every syntax, however the text is cut into pieces."""

import contextlib
import json
import shutil
from types import SimpleNamespace

import httpx
import pytest
import torch

from tandem.errors import TandemError
from tandem.runtime.llm import LLM
from tandem.runtime.grammar import Grammars, apply_masks, new_bitmask
from tandem.runtime.tokenizer import Tokenizer
from tandem.serve.tool_calls import SYNTAXES, ToolCallSplitter, check_tools, forced_grammar, syntax_of

from .conftest import MAX_CONTEXT, live_server

DS_V3 = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
         '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n'
         '```json\n{"zone": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
DS_V31 = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
          "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>')
MISTRAL = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "CET"}}]'

WEATHER = ("get_weather", {"city": "Paris"})
TIME = ("get_time", {"zone": "CET"})


def run(syntax: str, pieces: list[str]):
    splitter, content, calls = ToolCallSplitter(SYNTAXES[syntax]), "", []
    for piece in pieces:
        c, new = splitter.feed(piece)
        content, calls = content + c, calls + new
    c, new = splitter.flush()
    calls += new
    return content + c, [(call.name, json.loads(call.arguments)) for call in calls], calls


def cuts(text: str) -> list[list[str]]:
    """Whole, one character at a time, and cut in two at every position."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


@pytest.mark.parametrize("syntax, text, content, calls", [
    ("deepseek", DS_V3, "", [WEATHER, TIME]),
    ("deepseek", DS_V31, "", [WEATHER]),
    ("deepseek", "Sure." + DS_V31 + "\n", "Sure.", [WEATHER]),
    ("hermes", HERMES, "Let me check.\n", [WEATHER, TIME]),
    ("mistral", MISTRAL, "", [WEATHER, TIME]),
    ("hermes", "no calls here < tool_call >", "no calls here < tool_call >", []),
    ("hermes", "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\nDone.", "\nDone.", [("f", {})]),
])
def test_calls_and_content_survive_any_cut(syntax, text, content, calls):
    for pieces in cuts(text):
        got_content, got_calls, _ = run(syntax, pieces)
        assert (got_content, got_calls) == (content, calls), pieces


@pytest.mark.parametrize("syntax, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off by max_tokens
    ("hermes", "<tool_call>not json</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>'),  # arguments not an object
    ("deepseek", "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{oops}\n```<｜tool▁call▁end｜>"),
    ("deepseek", "<｜tool▁call▁begin｜>no separator<｜tool▁call▁end｜>"),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}'),  # unclosed list
])
def test_what_does_not_parse_comes_back_as_content(syntax, text):
    for pieces in cuts(text):
        content, calls, _ = run(syntax, pieces)
        assert calls == [] and content == text, pieces


def test_calls_get_ids_clients_and_templates_accept():
    *_, calls = run("hermes", [HERMES])
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    *_, calls = run("mistral", [MISTRAL])
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # Mistral's templates insist
    call = calls[0]
    assert call.openai(0) == {"index": 0, "id": call.id, "type": "function",
                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert call.ollama() == {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_syntax_is_read_off_the_chat_template():
    assert syntax_of("{% for tool_call in message.tool_calls %}<tool_call>\n{{ tool_call | tojson }}") is SYNTAXES["hermes"]
    assert syntax_of("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type']}}") is SYNTAXES["deepseek"]
    assert syntax_of("{{ '[TOOL_CALLS] ' + tool_calls | tojson }}") is SYNTAXES["mistral"]
    assert syntax_of("{{ messages[0]['content'] }}") is None
    assert syntax_of(None) is None


def test_tools_are_checked():
    good = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert check_tools(good) == good
    for bad in ({"type": "function"}, [{"type": "code_interpreter"}], [{"type": "function", "function": {}}],
                [{"type": "function", "function": {"name": ""}}], ["f"]):
        with pytest.raises(TandemError, match="tools"):
            check_tools(bad)


# --- through the server ---------------------------------------------------------------------------

TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<｜User｜># Tools\n{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<｜Assistant｜>{{ message['content'] }}"
    "{% for c in message.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments }}}</tool_call>{% endfor %}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}<｜User｜><tool_response>{{ message['content'] }}</tool_response>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_server(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("hermes") / "hermes"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    llm = LLM(path, dtype="float32", progress=False, max_context=MAX_CONTEXT)
    with live_server(llm, port=0, model_name="hermes") as live:
        yield live


def script(monkeypatch, server, pieces: list[str]):
    """The served model's next generation yields these text pieces, then finishes with 'stop'."""
    @contextlib.asynccontextmanager
    async def request(prompt, params):
        async def outputs():
            for i, piece in enumerate(pieces):
                yield SimpleNamespace(text=piece, token=0, logprobs=None,
                                      finish_reason="stop" if i == len(pieces) - 1 else None)
        yield outputs()

    monkeypatch.setattr(server.app.state.model.engine, "request", request)


def test_prompt_renders_the_offered_tools(tools_server):
    model = tools_server.app.state.model
    assert model.tool_syntax is SYNTAXES["hermes"]
    text = model.tokenizer.decode(model.chat_prompt(ASK, tools=[WEATHER_TOOL]).ids)
    assert '"name": "get_weather"' in text and "Weather in a city" in text
    assert "get_weather" not in model.tokenizer.decode(model.chat_prompt(ASK).ids)


def test_openai_reply_with_calls(tools_server, monkeypatch):
    body = {"model": "hermes", "messages": ASK, "tools": [WEATHER_TOOL]}
    pieces = ["<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>', "\n"]
    script(monkeypatch, tools_server, pieces)
    r = httpx.post(tools_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    script(monkeypatch, tools_server, ["Checking. "] + pieces)
    with httpx.stream("POST", tools_server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking. "
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "get_weather", {"city": "Paris"})]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_ollama_reply_with_calls(tools_server, monkeypatch):
    script(monkeypatch, tools_server, ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'])
    r = httpx.post(tools_server.url + "/api/chat", json={"model": "hermes", "messages": ASK, "stream": False,
                                                         "tools": [WEATHER_TOOL]}, timeout=60).json()
    assert r["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert r["message"]["content"] == "" and r["done_reason"] == "stop"
    show = httpx.post(tools_server.url + "/api/show", json={"model": "hermes"}, timeout=60).json()
    assert "tools" in show["capabilities"]


def test_a_conversation_with_calls_and_results_runs(tools_server):
    """The whole round trip on the real engine: the earlier call and its result go through the template."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    model = tools_server.app.state.model
    text = model.tokenizer.decode(model.chat_prompt([m for m in messages], tools=[WEATHER_TOOL]).ids)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<tool_response>sunny</tool_response>" in text
    r = httpx.post(tools_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "hermes", "messages": messages, "tools": [WEATHER_TOOL], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop", "tool_calls")


@pytest.mark.parametrize("extra, message, param", [
    ({"tool_choice": "always"}, "not one of", "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "not among", "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "no `tools`", "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined", "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "name", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tool_choice": "required"},
     "parameters", None),  # was a 500 (TypeError) in the forced grammar
    ({"functions": [{"name": "f"}]}, "as `tools`", "functions"),
])
def test_bad_tool_requests_get_a_400(tools_server, extra, message, param):
    body = {"model": "hermes", "messages": ASK, "tools": [WEATHER_TOOL], **extra}
    r = httpx.post(tools_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    if param:
        assert r.json()["error"]["param"] == param


CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}


@pytest.mark.parametrize("choice, names", [
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ("required", {"get_weather", "get_time"}),
])
def test_a_forced_tool_choice_makes_the_reply_calls(tools_server, choice, names):
    """Random weights would never write a call: the grammar makes them, with schema-true arguments."""
    body = {"model": "hermes", "messages": ASK, "tools": [CITY_TOOL, TIME_TOOL], "tool_choice": choice,
            "max_tokens": 120, "temperature": 0.8, "seed": 1}
    r = httpx.post(tools_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    choice0 = r["choices"][0]
    assert choice0["finish_reason"] == "tool_calls" and choice0["message"]["content"] is None, r
    calls = choice0["message"]["tool_calls"]
    assert calls and all(c["function"]["name"] in names for c in calls)
    for c in calls:
        args = json.loads(c["function"]["arguments"])
        assert args in ({"city": "Paris"}, {"city": "Rome"}, {"utc": True}, {"utc": False})


@pytest.mark.parametrize("syntax, template", [("hermes", ""), ("mistral", ""), ("deepseek", "```json"), ("deepseek", "")])
@pytest.mark.parametrize("name", [None, "get_time"])
def test_forced_grammars_write_calls_the_splitter_reads(model_dir, syntax, template, name):
    """Each syntax's forced grammar (DeepSeek V3's fenced arguments and V3.1's bare ones): random
    logits held to it decode to calls of the right tools whose arguments follow their schemas."""
    tok = Tokenizer.from_dir(model_dir)
    grammar = forced_grammar(SYNTAXES[syntax], template, [CITY_TOOL, TIME_TOOL], name, tok.token_to_id)
    for seed in range(3):
        constraint, g, out = Grammars(tok, tok.vocab_size).constraint(grammar), torch.Generator().manual_seed(seed), []
        while not constraint.done and len(out) < 300:
            logits, mask = torch.randn(1, tok.vocab_size, generator=g), new_bitmask(1, tok.vocab_size)
            constraint.fill(mask, 0)
            apply_masks(logits, [0], mask)
            out.append(int(logits[0].argmax()))
            assert constraint.advance(out[-1])
        content, calls, _ = run(syntax, [tok.decode([t for t in out if t not in tok.eos_ids])])
        assert constraint.done and content == "" and calls
        assert all(n == name for n, _ in calls) if name else len(calls) >= 1
        assert all(a in ({"city": "Paris"}, {"city": "Rome"}, {"utc": True}, {"utc": False}) for _, a in calls)


def test_forced_grammars_use_one_token_markers_where_the_vocabulary_has_them():
    ids = {"<tool_call>": 7, "</tool_call>": 8}
    grammar = forced_grammar(SYNTAXES["hermes"], "", [CITY_TOOL], "get_weather", ids.get)
    assert "<[7]>" in grammar and "<[8]>" in grammar and "<tool_call>" not in grammar


@pytest.mark.parametrize("syntax, text", [
    ("hermes", "<tool_call>" + "[" * 3000 + "</tool_call>"),
    ("hermes", '<tool_call>{"name": "f", "arguments": "' + "[" * 3000 + '"}</tool_call>'),
    ("mistral", "[TOOL_CALLS] " + "[" * 3000),
])
def test_degenerate_nesting_comes_back_as_content(syntax, text):
    """json.loads raises RecursionError past its depth: that was a 500 that lost the whole reply."""
    content, calls, _ = run(syntax, [text])
    assert calls == [] and content == text
