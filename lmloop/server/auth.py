"""API-key authentication as ASGI middleware, in front of every route.

With a key configured, every request needs `Authorization: Bearer <key>` (what the `openai`
client sends) or `X-API-Key: <key>`, compared in constant time. Exempt: `GET /health` (load
balancers probe it) and the chat page's static files (`/`, `/static/...`): they hold no data and
a browser cannot attach a header to a page load; the page asks for the key and sends it on every
API call it makes. Being middleware, it also covers routes added later (a test walks them all).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

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
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "authentication_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
