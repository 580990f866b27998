"""`tandem serve`: flags, one-line errors, and the command running a real server."""

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from tandem.cli.main import main


def test_serve_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--max-body-bytes", "--max-queue", "--model-name",
                 "--max-context", "--max-step-tokens"):
        assert flag in out
    assert "127.0.0.1" in out


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "out of range"),
    (["--max-body-bytes", "10"], "too small"),
    (["--max-queue", "0"], "--max-queue 0 is too small"),
    (["--max-step-tokens", "0"], "--max-step-tokens must be >= 1"),
    (["--api-key", " "], "--api-key is empty"),
    (["--allow-origin", "example.com"], "must look like http://host:port"),
])
def test_bad_flags_fail_with_one_line(argv, message, model_dir, capsys):
    assert main(["serve", str(model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_busy_port_fails_before_loading(model_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "/nonexistent/model", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_serve_command_runs_a_real_server(model_dir, monkeypatch, capsys):
    # In-process (a fresh Python would spend most of the test budget importing torch): main() runs
    # in a thread; we keep a handle on its uvicorn server to stop it, as Ctrl-C would.
    servers: list[uvicorn.Server] = []
    original = uvicorn.Server.run

    def run(self, sockets=None):
        servers.append(self)
        return original(self, sockets=sockets)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status: list[int] = []
    argv = ["serve", str(model_dir), "--port", str(port), "--max-context", "128", "--model-name", "cli-model"]
    thread = threading.Thread(target=lambda: status.append(main(argv)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (servers and servers[0].started):
        assert thread.is_alive() and time.monotonic() < deadline, capsys.readouterr().err
        time.sleep(0.02)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").json() == {"status": "ok", "model": "cli-model"}
        r = httpx.post(url + "/v1/completions", json={"model": "cli-model", "prompt": "hi", "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 128
    finally:
        servers[0].should_exit = True
        thread.join(30)
    assert status == [0]
    assert f"tandem serve: cli-model at {url}/ (chat page)" in capsys.readouterr().out
