"""The app's own ASGI middlewares: the request body cap and the access log.

`BodyLimitMiddleware` answers 413 for a body over the cap (announced or streamed) before any
route reads it; `AccessLogMiddleware` writes one line per request and counts it per route. Their
order, with auth and CORS, is set in `lmloop.server.app.create_app`.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmloop.server.errors import APIError, too_large
from lmloop.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """413 for bodies over the cap, whether announced (Content-Length) or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max(8 * max_bytes, 8 << 20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = 0
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
        if declared > self.drain_bytes:  # not worth reading: answer and drop the connection
            await _send_error(send, too_large(self.max_bytes))
            return
        # Buffer the body (at most the cap) and replay it, so no route reads past the cap. A
        # body somewhat over the cap is read and discarded before answering 413, so the client
        # (still sending) reads the answer instead of a reset connection.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:
                chunks.append(chunk)
            elif size > self.drain_bytes:
                break
            if not message.get("more_body", False):
                break
        if size > self.max_bytes:
            await _send_error(send, too_large(self.max_bytes))
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_KNOWN_ROUTES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/feedback",
    "/v1/lmloop/versions",
    "/admin/reload",
    "/health",
    "/metrics",
    "/",
}


class AccessLogMiddleware:
    """One log line per request (method, path, status, time; never the client address) and the
    per-route request counter."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"]
            route = path if path in _KNOWN_ROUTES else "other"
            self.metrics.requests.labels(route, str(status or 499)).inc()
            log.debug(
                "%s %s %s %.0fms",
                scope["method"],
                path[:200],
                status or "-",
                (time.perf_counter() - t0) * 1000,
            )
