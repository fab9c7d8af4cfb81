"""The app's own ASGI middlewares: the request body cap, the origin check, the access log
(which gives every request its id) and the API key.

`BodyLimitMiddleware` answers 413 for a body over the cap (announced or streamed) before any
route reads it; `AccessLogMiddleware` writes one line per request and counts it per route. Their
order, with auth and CORS, is set in `lmloop.server.app.create_app`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmloop.server.errors import REQUEST_ID_HEADER, APIError, new_request_id, too_large
from lmloop.server.metrics import ServerMetrics
from lmloop.server.settings import parse_origin, split_host

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
            await too_large(self.max_bytes).send(send, close=True)
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
            await too_large(self.max_bytes).send(send, close=True)
            return
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class OriginCheckMiddleware:
    """403 for a request whose `Host` or `Origin` header names another site than this server,
    on a server without an API key: a web page the user visits could otherwise reach a keyless
    server on loopback (a cross-site request, or DNS rebinding: attacker.example resolving to
    127.0.0.1). The server's own address is the one the connection reached (`scope["server"]`),
    plus localhost / 127.0.0.1 / [::1] at the same port when that is loopback; `allowed` adds
    origins (`--allowed-origin`, `--cors-origin`): `http://host:port`, `host:port`, `host` (any
    port), or `*` (no check). A request with neither header (curl, SDKs) passes."""

    def __init__(self, app: ASGIApp, allowed: list[str]):
        self.app = app
        self.any = "*" in allowed
        self.allowed = [a for a in (parse_origin(x) for x in allowed if x != "*") if a]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        server = scope.get("server")
        default = 443 if scope.get("scheme") == "https" else 80
        host = origin = None
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        bad = None
        if host is not None and not self._ok(split_host(host, default), server):
            bad = ("Host", host)
        elif origin is not None and not self._ok(parse_origin(origin), server):
            bad = ("Origin", origin)
        if bad is None:
            await self.app(scope, receive, send)
            return
        log.warning("refused a request with %s %r (not this server's)", bad[0], bad[1][:100])
        await APIError(
            403,
            f"the {bad[0]} header '{bad[1][:100]}' is not this server's address; a server "
            "without an API key answers only its own origin (allow more with "
            "--allowed-origin, or set --api-key)",
            code="origin_not_allowed",
        ).send(send, close=True)

    def _ok(self, where: tuple[str, int | None] | None, server: Any) -> bool:
        if where is None:
            return False
        name, port = where
        for a_name, a_port in self.allowed:
            if same_host(name, a_name) and (a_port is None or a_port == port):
                return True
        if not server:  # not a TCP socket (a Unix socket): no address to be rebound
            return True
        s_host, s_port = server[0], server[1]
        if port != s_port:
            return False
        return same_host(name, s_host) or (is_loopback(s_host) and is_loopback(name))


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return mapped or ip


def same_host(a: str, b: str) -> bool:
    ia, ib = _ip(a), _ip(b)
    if ia is not None or ib is not None:
        return ia == ib
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def is_loopback(name: str) -> bool:
    if name.lower().rstrip(".") == "localhost":
        return True
    ip = _ip(name)
    return bool(ip and ip.is_loopback)


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
    """Gives each request its id (`request.state.request_id`, answered as `x-request-id`), then
    one log line per request (id, method, path, status, time; never the client address) and the
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
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append(REQUEST_ID_HEADER, rid)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"]
            route = path if path in _KNOWN_ROUTES else "other"
            self.metrics.requests.labels(route, str(status or 499)).inc()
            log.debug(
                "%s %s %s %s %.0fms",
                rid,
                scope["method"],
                path[:200],
                status or "-",
                (time.perf_counter() - t0) * 1000,
            )


# ---- API key ---------------------------------------------------------------------------------
PUBLIC_PATHS = frozenset({"/health", "/", "/index.html", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def is_public(method: str, path: str) -> bool:
    if method not in ("GET", "HEAD"):
        return False
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
        elif lname == b"x-api-key":
            return value.strip()
    return None


class APIKeyMiddleware:
    """With a key configured, every request needs `Authorization: Bearer <key>` (what the
    `openai` client sends) or `X-API-Key: <key>`, compared in constant time. Exempt: `GET
    /health` (load balancers probe it) and the chat page's static files: they hold no data and a
    browser cannot attach a header to a page load (the page sends the key on every API call).
    Being middleware, it also covers routes added later (a test walks them all)."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or is_public(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        given = _presented_key(scope.get("headers", []))
        # compare_digest takes time independent of where the strings differ.
        if given is not None and hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send 'Authorization: Bearer <key>'"
            if given is None
            else "incorrect API key"
        )
        err = APIError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        await err.send(send)
