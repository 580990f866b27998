"""The gate every HTTP request passes first (a plain ASGI middleware, so streams are untouched).

In order: count the request in the metrics (by route template and status, whatever happens);
refuse foreign Host headers on a loopback server (DNS rebinding) and cross-site browser Origins
(a web page must not drive a local model); check the API key on every route but /health and the
page; cap the request body; turn any exception that escaped the app into a logged 500.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.serve.errors import APIError, error_bytes, internal_error
from tandem.serve.metrics import Metrics
from tandem.serve.settings import ServeSettings

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/")  # the page loads without the key, then asks for it
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class Gate:
    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, status = scope["path"], []

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _reply(send_and_note, path, *refusal)
            else:
                await self.app(scope, self._capped(receive), send_and_note)
        except Exception as e:  # noqa: BLE001 - no request may take the server down
            if status:
                log.error("error after the response to %s started", path, exc_info=e)
            else:
                await _reply(send_and_note, path, 500, internal_error(path, e))
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("/" if path == "/" else "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"  # no series per made-up method
            self.metrics.count_request(method, label, status[0] if status else 500)

    def _refusal(self, scope: Scope) -> tuple[int, str, str | None, dict[str, str]] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.settings.loopback and _hostname(host) not in _LOOPBACK_NAMES:
            return (403, f"Host {host!r} is refused: this server listens on {self.settings.host} and answers to "
                         "localhost names only; restart it with --host to serve other names", None, {})
        origin = headers.get("origin")
        if origin is not None and origin not in self.settings.allowed_origins and _netloc(origin) != host:
            return (403, f"requests from web pages at {origin} are refused: only this server's own page may call it",
                    None, {})
        if self._key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if not given:
                return (401, "missing API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key",
                        {"WWW-Authenticate": "Bearer"})
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self._key):
                return 401, "incorrect API key", "invalid_api_key", {"WWW-Authenticate": "Bearer"}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            return 413, _too_big(self.settings.max_body_bytes), None, {}
        return None

    def _capped(self, receive: Receive) -> Receive:
        """receive() that stops a chunked body once it passes the limit (Content-Length was checked)."""
        limit, seen = self.settings.max_body_bytes, [0]

        async def capped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise APIError(413, _too_big(limit))
            return message

        return capped


async def _reply(send: Send, path: str, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
    body = error_bytes(path, status, message, code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def _too_big(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (the server's --max-body-bytes)"


def _hostname(host: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'; '' for a malformed one ('[::1')."""
    try:
        return urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return ""


def _netloc(origin: str) -> str | None:
    """'http://localhost:8000' -> 'localhost:8000'; None for a malformed origin (a foreign one)."""
    try:
        return urlsplit(origin).netloc
    except ValueError:
        return None
