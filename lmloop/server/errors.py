"""Errors in OpenAI's wire shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server answers goes through `APIError` (or is converted to it by the
handlers `install_error_handlers` registers), so clients such as the official `openai` package
map the status to their typed exceptions (400 -> BadRequestError, 401 -> AuthenticationError,
404 -> NotFoundError, 429 -> RateLimitError). Nothing a client sends should reach the generic
500 handler; it exists so that a bug answers in the same shape and the server keeps running.
A 500 names no internals: its message is generic and carries the request's id (also its
`x-request-id` header); the log holds the traceback under that id.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"

# OpenAI's `type` for each status the server answers.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An HTTP error answered as `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    async def send(self, send: Any, *, close: bool = False) -> None:
        """Answer from an ASGI middleware, before any route runs; `close`: drop the connection."""
        body = json.dumps(self.body()).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        headers += [(k.encode(), v.encode()) for k, v in self.headers.items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def too_large(max_bytes: int) -> APIError:
    """413 for a request body over the cap (the body-size middleware and `read_json_body`)."""
    return APIError(
        413, f"request body too large: the limit is {max_bytes} bytes", code="request_too_large"
    )


def unknown_model(name: str, served: str | None) -> APIError:
    """404 for a model name the server does not answer to; `served`: the name it does."""
    return APIError(
        404,
        f"the model '{name[:200]}' does not exist; this server serves '{served}'",
        param="model",
        code="model_not_found",
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (unknown path, wrong method) and other routers' HTTPExceptions.
        detail = exc.detail
        if isinstance(detail, dict) and "error" in detail:
            return JSONResponse(detail, status_code=exc.status_code, headers=exc.headers)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(detail), code=code, headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return APIError(
            400, str(first.get("msg", "invalid request")), param=".".join(loc) or None
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.error("request %s: unexpected error while answering", rid, exc_info=exc)
        return internal_error(rid).response()


def request_id(request: Request) -> str:
    """The id `AccessLogMiddleware` gave this request (answered as `x-request-id`)."""
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else new_request_id()


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex[:24]


def internal_error(rid: str, what: str = "internal error") -> APIError:
    """A 500 that names no internals: what failed, in general words, and the request id under
    which the server's log has the traceback."""
    return APIError(
        500,
        f"{what}; the server log has the details under request id {rid}",
        code="internal_error",
        headers={REQUEST_ID_HEADER: rid},
    )
