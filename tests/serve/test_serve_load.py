"""benchmarks/serve_load.py end to end on a tiny model: against a live server (--url), starting its
own `tandem serve`, and with servers that fail. Checks fields and counts, never speed."""

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest

from tests.conftest import script_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
PERCENTILES = {"p50", "p90", "p99"}
LEVEL_FIELDS = {"concurrency", "requests", "ok", "failed", "errors", "stopped_by_time_limit", "wall_s",
                "output_tokens", "prompt_tokens_mean", "output_tok_s", "requests_per_s", "ttft_ms", "itl_ms",
                "vs_concurrency_1"}


@pytest.fixture(scope="module")
def load():
    with script_module(SCRIPT, "serve_load_bench") as mod:
        yield mod


def check_report(report: dict, levels: list[int], requests: int, max_tokens: int) -> None:
    assert [lv["concurrency"] for lv in report["levels"]] == levels
    for lv in report["levels"]:
        assert set(lv) == LEVEL_FIELDS
        assert lv["requests"] == lv["ok"] + lv["failed"] == requests and lv["failed"] == 0 and lv["errors"] == {}
        assert lv["output_tokens"] == lv["ok"] * max_tokens > 0  # ignore_eos: every answer is max_tokens long
        assert lv["wall_s"] > 0 and lv["output_tok_s"] > 0 and lv["prompt_tokens_mean"] > 0
        for key in ("ttft_ms", "itl_ms"):
            assert set(lv[key]) == PERCENTILES
            assert 0 < lv[key]["p50"] <= lv[key]["p90"] <= lv[key]["p99"]
        assert lv["vs_concurrency_1"] > 0
    assert report["levels"][0]["vs_concurrency_1"] == 1.0


def test_load_against_a_running_server(load, idle, tmp_path, capsys):
    out = tmp_path / "load.json"
    argv = ["--url", idle.url, "--concurrency", "1,4", "--requests", "4", "--max-tokens", "5", "--prompt-tokens",
            "40", "--json", str(out)]
    assert load.main(argv) == 0
    report = json.loads(out.read_text())
    check_report(report, [1, 4], requests=4, max_tokens=5)
    assert report["model"] == "tiny" and report["server_command"] is None
    assert report["config"]["concurrency"] == [1, 4] and report["prompt"]["words"] >= 1
    # The prompts were sized from the server's own counts (chat template included); the tiny
    # tokenizer spends ~3 tokens per word, so they land within a few words of the target.
    assert all(30 <= lv["prompt_tokens_mean"] <= 50 for lv in report["levels"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-3].split()[:2] == ["conc", "reqs"] and printed[-1].split()[:4] == ["4", "4", "4", "0"]


def test_load_starts_and_stops_its_own_server(load, model_dir, tmp_path, capsys):
    out = tmp_path / "own.json"
    argv = ["--server-args", f"{model_dir} --max-context 128 --threads 1 --api-key sekret", "--concurrency", "1,2",
            "--requests", "2", "--max-tokens", "3", "--prompt-tokens", "16", "--json", str(out)]
    assert load.main(argv) == 0
    report = json.loads(out.read_text())
    check_report(report, [1, 2], requests=2, max_tokens=3)
    command = report["server_command"]
    assert command[1:4] == ["-m", "tandem", "serve"] and command[-2:] == ["--max-batch", "2"]
    assert "sekret" not in out.read_text() and "sekret" not in capsys.readouterr().err  # the key is never shown
    with pytest.raises(httpx.ConnectError):  # the server is gone
        httpx.get(report["url"] + "/health", timeout=5)


def test_unreachable_url_is_one_clear_error(load, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    assert load.main(["--url", f"http://127.0.0.1:{port}", "--concurrency", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach http://127.0.0.1:{port}") and "--url" in err
    assert err.count("\n") == 1


def test_a_server_that_cannot_start_shows_its_error(load, capsys):
    assert load.main(["--server-args", "/nonexistent/model", "--concurrency", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: tandem serve exited with status 2 before it was ready" in err
    assert "model path '/nonexistent/model' does not exist" in err  # the server's own line


def test_requests_the_server_refuses_fail_the_warm_up_clearly(load, idle, capsys):
    # A prompt longer than the server's context window: the server's 400 message comes through.
    assert load.main(["--url", idle.url, "--concurrency", "1", "--prompt-tokens", "5000"]) == 2
    err = capsys.readouterr().err
    assert "error: the warm-up request failed: HTTP 400" in err and "context window" in err


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0,4"], "give levels >= 1"),
    (["--concurrency", "4,x"], "comma-separated integers"),
    (["--concurrency", "8", "--requests", "4"], "fewer than --concurrency 8"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--url", "localhost:8000"], "must look like http://host:port"),
    (["--url", "http://127.0.0.1:8000", "--server-args", "model"], "leave out --url"),
    (["--server-args", "model --port 9000"], "must not set --port"),
])
def test_bad_flags(load, argv, message, capsys):
    assert load.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def test_failed_requests_are_counted_by_error(load):
    """Every third request gets 429, every fourth ends before [DONE]: the counts and tallies add up."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        n = len(calls)
        if n % 3 == 0:
            return httpx.Response(429, json={"error": {"message": "the server is busy"}}, headers={"Retry-After": "1"})
        chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
        chunks += [{"choices": [{"delta": {"content": f"t{i}"}, "finish_reason": None}]} for i in range(3)]
        if n % 4 == 0:
            return httpx.Response(200, content=sse(*chunks))
        chunks += [{"choices": [{"delta": {}, "finish_reason": "length"}]},
                   {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}]
        return httpx.Response(200, content=sse(*chunks, b"[DONE]"))

    cfg = load.LoadConfig(url="http://fake", concurrency=(4,), requests=12, max_tokens=3)

    async def level():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://fake") as client:
            return await load.run_level(client, cfg, "m", 4, words=5)

    lv = asyncio.run(level())
    assert len(calls) == lv["requests"] == 12
    assert lv["failed"] == 4 + 2 and lv["ok"] == 6  # 3, 6, 9, 12 refused; 4 and 8 cut short
    assert lv["errors"] == {"HTTP 429: the server is busy": 4,
                            "the stream ended before its finish_reason and [DONE]": 2}
    assert lv["output_tokens"] == 6 * 3 and lv["prompt_tokens_mean"] == 11
    assert lv["itl_ms"]["p50"] is not None and lv["ttft_ms"]["p99"] is not None
    prompts = {json.loads(c.content)["messages"][0]["content"] for c in calls}
    assert len(prompts) == 12  # every request's prompt is distinct
