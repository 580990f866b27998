"""Error responses: OpenAI's error body everywhere, Ollama's `{"error": "..."}` on /api/* routes.

Handlers are installed by `install_handlers(app)`: APIError and TandemError (the user's fault) ->
4xx with their message; request validation -> 400; anything else -> 500, logged, server goes on.
"""

from __future__ import annotations

import json
import logging
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tandem.errors import TandemError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
          429: "rate_limit_error"}


class APIError(Exception):
    """A request the server refuses; becomes an error body with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    if is_ollama_path(path):
        return {"error": message}
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, param, code), status_code=status, headers=headers)


def error_bytes(path: str, status: int, message: str, code: str | None = None) -> bytes:
    """The same body as bytes, for middleware that answers before FastAPI does."""
    return json.dumps(error_body(path, status, message, code=code)).encode()


def validation_message(e: pydantic.ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field, and that field's dotted path (OpenAI's `param`)."""
    errors = e.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {json.dumps(got)[:60]})"
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}{shown}{more}", param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(request.url.path, e.status, e.message, e.param, e.code, headers=e.headers)

    @app.exception_handler(TandemError)
    async def _tandem_error(request: Request, e: TandemError) -> JSONResponse:
        return error_response(request.url.path, 400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(e)
        return error_response(request.url.path, 400, message, param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see /v1/... (OpenAI) or /api/... (Ollama)"
        return error_response(request.url.path, e.status_code, message, headers=getattr(e, "headers", None))


def internal_error(path: str, error: BaseException) -> str:
    """Log an unexpected exception with its traceback; the message to show the client."""
    log.error("unexpected error while serving %s", path, exc_info=error)
    return f"internal server error ({type(error).__name__}); see the server log"
