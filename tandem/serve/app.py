"""`create_app(llm, settings)`: the FastAPI app over one model; `run_server` serves it with uvicorn.

The app owns an AsyncEngine (the Engine's thread), started and stopped by the app's lifespan,
so building an app does no work. Routes: the web chat page at /, /health, /metrics, the OpenAI
routes under /v1 and the Ollama routes under /api.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from importlib import resources

import anyio
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.middleware.cors import CORSMiddleware

from tandem.errors import TandemError
from tandem.runtime.async_engine import AsyncEngine
from tandem.runtime.engine import Engine
from tandem.runtime.llm import LLM
from tandem.serve.errors import install_handlers
from tandem.serve.metrics import Metrics
from tandem.serve.middleware import Gate
from tandem.serve.model import ServedModel
from tandem.serve.ollama_api import ollama_router
from tandem.serve.openai_api import openai_router
from tandem.serve.settings import ServeSettings

log = logging.getLogger(__name__)

# The page is one file with inline script and style; this policy forbids everything else
# (no remote code, no frames), so text the model writes can never load or run anything.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def create_app(model: LLM | Engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    engine = model.engine if isinstance(model, LLM) else model
    idle = model.rebalance_hot_experts if isinstance(model, LLM) and model.hot_experts else None
    async_engine = AsyncEngine(engine, max_queue=settings.max_queue, on_idle=idle)
    metrics = Metrics()
    served = ServedModel(model, settings.model_name, async_engine, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(async_engine.close)

    # No /docs: Swagger UI would load from a CDN, and the server must work offline.
    app = FastAPI(title="tandem", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.settings, app.state.model, app.state.engine, app.state.metrics = settings, served, async_engine, metrics
    install_handlers(app)
    app.include_router(openai_router(served))
    app.include_router(ollama_router(served))

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)  # Ollama clients probe HEAD /
    async def page() -> HTMLResponse:
        html = resources.files("tandem.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD too
    async def health() -> JSONResponse:
        alive = async_engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": served.name},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = metrics.render(async_engine.queue_depth, async_engine.running)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Gate, settings=settings, metrics=metrics)  # added last = runs first
    return app


def bind(settings: ServeSettings) -> socket.socket:
    """Bind the listening socket ourselves, to report a busy port as one clear line."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as e:
        sock.close()
        raise TandemError(f"cannot listen on {settings.host}:{settings.port} ({e.strerror}): "
                          "pick another --port or stop the program using it") from None
    sock.set_inheritable(True)
    return sock


def run_server(model: LLM | Engine, settings: ServeSettings, sock: socket.socket | None = None) -> int:
    """Serve until interrupted (Ctrl-C) on `sock` (default: bind one now); returns the exit status."""
    import uvicorn

    sock = sock or bind(settings)
    app = create_app(model, settings)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"tandem serve: {app.state.model.name} at {url}/ (chat page), {url}/v1 (OpenAI), {url}/api (Ollama)",
          flush=True)
    if not settings.loopback and settings.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model",
                    settings.host)
    config = uvicorn.Config(app, log_level=settings.log_level, timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
