"""Live servers on tiny models, on 127.0.0.1 and a free port, each in a background thread.

`server` (no API key, small body limit) is shared by the package's tests; `reference` is a
second LLM on the same weights that the tests use for expected outputs (the server's own LLM
belongs to its engine thread).
"""

import contextlib
import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch
import uvicorn

from tandem.runtime.llm import LLM
from tandem.runtime.tokenizer import Tokenizer
from tandem.serve.app import create_app
from tandem.serve.settings import ServeSettings
from tandem.testing.tiny import write_tiny

MAX_CONTEXT = 512
BODY_LIMIT = 64 * 1024


@dataclass
class LiveServer:
    url: str
    app: object
    uvicorn: uvicorn.Server

    @property
    def name(self) -> str:
        return self.app.state.model.name

    @property
    def metrics(self):
        return self.app.state.metrics

    def engine_state(self) -> tuple[bool, int, int]:
        """(has work, free KV blocks, all KV blocks), read on the engine thread between steps."""
        future = self.app.state.engine.call(lambda e: (e.has_work(), e.cache.free_blocks, e.cache.num_blocks))
        return future.result(timeout=30)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once the engine has no work and every KV block is free."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy, free, total = self.engine_state()
            if not busy and free == total:
                return True
            time.sleep(0.02)
        return False


@contextlib.contextmanager
def live_server(llm, **settings):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    app = create_app(llm, ServeSettings(**settings))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    # The server's engine thread, its event loop and the test client share 2 cores: torch's own
    # thread pool on top of them makes tiny-model steps 50x slower, not faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("serve-v3"), "deepseek_v3", seed=2)


@pytest.fixture(scope="package")
def reference(model_dir):
    return LLM(model_dir, dtype="float32", progress=False, max_context=MAX_CONTEXT)


@pytest.fixture(scope="package")
def server(model_dir):
    llm = LLM(model_dir, dtype="float32", progress=False, max_context=MAX_CONTEXT)
    with live_server(llm, port=0, max_body_bytes=BODY_LIMIT, model_name="tiny") as live:
        yield live


@contextlib.contextmanager
def engine_held(live: LiveServer):
    """The engine thread held between steps for the block: requests queue up, none is answered."""
    gate = threading.Event()
    blocked = live.app.state.engine.call(lambda e: gate.wait(30))
    try:
        yield
    finally:
        gate.set()
        blocked.result(timeout=30)


@contextlib.contextmanager
def queue_limited(model_dir, max_queue: int):
    """A server of its own whose queue holds `max_queue` requests waiting for their first token."""
    llm = LLM(model_dir, dtype="float32", progress=False, max_context=MAX_CONTEXT)
    with live_server(llm, port=0, model_name="tiny", max_queue=max_queue) as live:
        yield live


@pytest.fixture
def idle(server):
    """Each test starts and ends with an idle engine and a full KV cache (nothing leaked)."""
    assert server.wait_idle(), "a previous test left work in the engine"
    yield server
    assert server.wait_idle(), "the test left work in the engine or KV blocks in use"


@pytest.fixture(scope="package")
def thinking_server(model_dir, tmp_path_factory):
    # An R1-0528 style template: the generation prompt already opens the <think> block.
    path = tmp_path_factory.mktemp("r1") / "r1"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    opened = config["chat_template"].replace("<｜Assistant｜>{% endif %}", "<｜Assistant｜><think>\n{% endif %}")
    assert opened != config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": opened}))
    llm = LLM(path, dtype="float32", progress=False, max_context=MAX_CONTEXT)
    with live_server(llm, port=0, model_name="r1") as live:
        yield live, Tokenizer.from_dir(path)
