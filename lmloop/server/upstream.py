"""`lmloop serve --upstream URL`: the routes' generation forwarded to OpenAI-compatible servers.

    lmloop serve --model registry:mine --upstream http://127.0.0.1:8080 --upstream-model base
    lmloop serve --model registry:mine --upstream http://gpu-a:8000 --upstream http://gpu-b:8000

`UpstreamBackend` is the second `lmloop.server.backend.Backend`: the routes parse and validate a
request as they do for the local engine (same 400s), then it goes to one replica of the
upstream (lmloop.server.routing picks which) with the model name the upstream knows, and
lmloop.server.upstream_exchange relays and records its answer. One pooled `httpx.AsyncClient`
carries every call to every replica.

- `echo` and `logprobs` go through when the upstream honours them. What it ignores (probed at
  start on one replica, and noticed on any answer) is refused with 400 `unsupported_by_upstream`.
- The upstream's own errors come back with its status and message (401/403, which mean lmloop's
  `--upstream-key` is wrong, as 502). A replica that refuses the connection, or closes or resets it without
  answering, is skipped for the next one (the request had not been answered); when none is left,
  502; one slower than `--request-timeout` 504. A stream a replica breaks off ends with an SSE
  error event.
- Which model name and version label new requests get is the `Route`, the same on every
  replica; a promotion (lmloop.server.promotion) replaces it only once every replica answered a
  health prompt under the new version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmloop.errors import UserError
from lmloop.registry import Registry, split_spec
from lmloop.server.backend import SnapshotRow
from lmloop.server.errors import APIError, unknown_model
from lmloop.server.promotion import HEALTH_PROMPT, Promoter, Route
from lmloop.server.protocol import ChatRequest, CompletionRequest
from lmloop.server.routing import Replica, ReplicaPool
from lmloop.server.state import ServerState
from lmloop.server.upstream_checks import auth_headers, models_from, pick_model
from lmloop.server.upstream_config import UpstreamSpec
from lmloop.server.upstream_exchange import Exchange, status_error

log = logging.getLogger(__name__)

VERSION_HEADER = "x-lmloop-model-version"
# Failures after which the request is sent to the next replica: no byte of its answer came back
# (they are raised before the status line). A refused connection never carried it; one closed
# or reset before answering is most often a kept-alive connection the server closed as it was
# reused, or a replica that died. (Generation has no side effect on the upstream to repeat.)
RESEND = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
          httpx.WriteError)  # fmt: skip
# A kept-alive connection idle this long is not reused: shorter than the idle timeout of
# llama-server (5 s) and uvicorn (5 s), so lmloop does not race them closing it.
KEEPALIVE_S = 2.0


class UpstreamBackend:
    """Generation by an OpenAI-compatible upstream (lmloop.server.backend.Backend)."""

    def __init__(self, state: ServerState):
        self.state = state
        self.settings = state.settings
        self.up: UpstreamSpec = state.settings.upstream
        self.spec = state.settings.model or ""
        self.pool = ReplicaPool(self.up.urls)
        self.client: httpx.AsyncClient | None = None
        self.route: Route | None = None
        self.model_id: str | None = None
        self.error: str | None = None
        self.inflight = 0
        self.waiting = 0
        self.open = asyncio.Event()  # cleared while a promotion restarts the replicas
        self.open.set()
        self.unsupported: set[str] = set()  # "logprobs", "chat_logprobs", "echo"
        self.promoter = Promoter(self)
        self.started_at = time.time()

    # -- life cycle --
    async def start(self) -> None:
        timeout = httpx.Timeout(self.settings.request_timeout, connect=10.0)
        self.client = httpx.AsyncClient(
            headers=auth_headers(self.up.upstream_key),
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=512, max_keepalive_connections=64, keepalive_expiry=KEEPALIVE_S
            ),  # fmt: skip
        )
        self.state.tasks.append(asyncio.create_task(self._connect()))

    async def _connect(self) -> None:
        assert self.client is not None
        model, why = None, "no replica"
        for rep in self.pool.replicas:
            try:
                ids = models_from(rep.url, await self.client.get(rep.base + "/v1/models"))
                model = model or pick_model(rep.url, ids, self.up.upstream_model)
            except (UserError, httpx.HTTPError) as e:
                why = e.line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                self.pool.fail(rep, why)
        try:
            if model is None:
                raise UserError(why)
            version, sha = await asyncio.to_thread(self._registry_version, model)
        except UserError as e:
            self.error = e.line()
            log.error("upstream not usable: %s", self.error)
            if self.state.on_load_failure is not None:
                self.state.on_load_failure(self.error)
            return
        self.model_id = self.settings.model_name or self.registry_name() or model
        route = Route(model, version, sha)
        await self._probe(route)
        self.route = route  # ready (`/health` 200) once the probe knows what the upstream honours
        log.info(
            "serving %s through %s (upstream model %s, version %s)",
            self.model_id, self.up.shown, model, version,
        )  # fmt: skip
        self.state.tasks.append(asyncio.create_task(self.pool.watch(self._health_check)))
        if self.registry_name() is not None:
            poll = self.settings.registry_poll
            self.state.tasks.append(asyncio.create_task(self.promoter.follow(poll)))

    def _registry_version(self, model: str) -> tuple[str, str]:
        """(version label, sha256) of what the upstream serves at start: the registry's current
        version of `registry:NAME` (the upstream is expected to serve it), else the model name."""
        name = self.registry_name()
        if name is None:
            return model, ""
        _, version, _ = Registry().resolve(self.spec)
        return version, self.promoter.sha256(name, version)

    async def _probe(self, route: Route) -> None:
        """Find out which of `logprobs` and `echo` the upstream honours (one token each), on the
        first replica in rotation: replicas run the same server and model."""
        assert self.client is not None
        reps = self.pool.candidates()
        checks = [
            ("chat_logprobs", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": HEALTH_PROMPT}], "logprobs": True,
              "top_logprobs": 1},
             lambda c: bool((c.get("logprobs") or {}).get("content"))),
            ("logprobs", "/v1/completions", {"prompt": HEALTH_PROMPT, "logprobs": 1},
             lambda c: bool((c.get("logprobs") or {}).get("tokens"))),
            ("echo", "/v1/completions", {"prompt": HEALTH_PROMPT, "echo": True},
             lambda c: str(c.get("text", "")).startswith(HEALTH_PROMPT)),
        ]  # fmt: skip
        for what, path, extra, ok in checks:
            body = {"model": route.upstream_model, "max_tokens": 1, "temperature": 0, **extra}
            try:
                r = await self.client.post(reps[0].base + path, json=body)
                good = r.status_code < 400 and ok(r.json()["choices"][0])
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError):
                good = False
            if not good:
                self.unsupported.add(what)
        if self.unsupported:
            log.info("the upstream does not honour: %s", ", ".join(sorted(self.unsupported)))

    async def answers(self, rep: Replica, model: str, timeout: float) -> None:
        """One health prompt (one token) to `model` on `rep`; raises when it does not answer."""
        assert self.client is not None
        body = {"model": model, "messages": [{"role": "user", "content": HEALTH_PROMPT}],
                "max_tokens": 1, "temperature": 0}  # fmt: skip
        r = await self.client.post(rep.base + "/v1/chat/completions", json=body, timeout=timeout)
        if r.status_code >= 400 or not r.json().get("choices"):
            raise RuntimeError(f"{r.status_code}: {r.text[:200]}")

    async def _health_check(self, rep: Replica) -> None:
        """The watcher's check of a replica out of rotation: it answers the served model."""
        if self.route is not None:
            await self.answers(rep, self.route.upstream_model, 10.0)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    # -- what the routes read --
    def registry_name(self) -> str | None:
        return split_spec(self.spec)[0] if self.spec.startswith("registry:") else None

    def serving_version(self) -> str | None:
        return self.route.version if self.route is not None else None

    def status(self) -> dict[str, Any] | None:
        route = self.route
        return {
            "url": self.up.shown,
            "replicas": [r.status() for r in self.pool.replicas],
            "model": route.upstream_model if route else None,
            "version": route.version if route else None,
            "reload": self.up.upstream_reload,
            "promotion": self.promoter.last,
            "unsupported": sorted(self.unsupported),
        }

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.error is not None:
            return 503, {"status": "error", "error": self.error}
        route = self.route
        if route is None:
            return 503, {"status": "loading"}
        return 200, {
            "status": "ok",
            "model": self.model_id,
            "model_version": route.version,
            "upstream": self.up.shown,
            "upstream_model": route.upstream_model,
            "replicas": [r.status() for r in self.pool.replicas],
            "running": self.inflight,
            "waiting": self.waiting,
            "promotion": self.promoter.last,
        }

    def _ready(self) -> Route:
        if self.route is None:
            msg = self.error or "connecting to the upstream; retry shortly"
            raise APIError(503, msg, code="model_not_ready", headers={"retry-after": "2"})
        return self.route

    def cards(self) -> list[dict[str, Any]]:
        route = self._ready()
        return [
            {
                "id": self.model_id,
                "object": "model",
                "created": int(self.started_at),
                "owned_by": "lmloop",
                "model_version": route.version,
                "upstream_model": route.upstream_model,
                # the chat page asks for logprobs only where the upstream returns them
                "logprobs": "chat_logprobs" not in self.unsupported,
            }
        ]

    def _accepts(self, name: str, route: Route) -> bool:
        names = {self.model_id, route.version, f"{self.model_id}@{route.version}"}
        return name in names | {route.upstream_model}

    def card(self, model_id: str) -> dict[str, Any]:
        route = self._ready()
        if not self._accepts(model_id, route):
            raise unknown_model(model_id, self.model_id)
        return self.cards()[0]

    def snapshot(self) -> list[SnapshotRow]:
        route = self.route
        if route is None or self.model_id is None:
            return []
        return [(self.model_id, route.version, self.inflight, self.waiting, True, {})]

    # -- generation --
    def _check_supported(self, req: ChatRequest | CompletionRequest, chat: bool) -> None:
        asked_lp = bool(req.logprobs) if chat else req.logprobs is not None
        if asked_lp and ("chat_logprobs" if chat else "logprobs") in self.unsupported:
            raise self.unsupported_error("logprobs")
        if not chat and req.echo and "echo" in self.unsupported:
            raise self.unsupported_error("echo")

    def unsupported_error(self, param: str) -> APIError:
        model = self.route.upstream_model if self.route else "?"
        return APIError(
            400,
            f"the upstream ({model} at {self.up.shown}) does not honour '{param}', so this "
            f"server cannot answer it; send the request without '{param}'",
            param=param,
            code="unsupported_by_upstream",
        )

    async def _enter(self) -> Route:
        """Wait while a promotion restarts the replicas, then count the request in."""
        if not self.open.is_set():
            self.waiting += 1
            try:
                await asyncio.wait_for(self.open.wait(), self.settings.request_timeout)
            except asyncio.TimeoutError:
                raise APIError(
                    503, "the upstream is being reloaded; retry shortly",
                    code="model_not_ready", headers={"retry-after": "2"},
                ) from None  # fmt: skip
            finally:
                self.waiting -= 1
        route = self._ready()
        self.inflight += 1
        return route

    def exit(self, rep: Replica | None) -> None:
        self.inflight -= 1
        if rep is not None:
            self.pool.release(rep)

    async def drain(self, timeout: float) -> None:
        """Stop taking requests (they wait) and let those in flight finish within `timeout`."""
        self.open.clear()
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _send(self, ex: Exchange, path: str, payload: dict) -> httpx.Response:
        """The request sent to the replicas by the pool's policy until one answers (its status
        line and headers; the body is the caller's to read); the replica stays counted in
        `ex.replica` until `exit`. Raises APIError."""
        assert self.client is not None
        failed: list[str] = []
        queue, resent = self.pool.candidates(), False
        while queue:
            rep = queue.pop(0)
            self.pool.acquire(rep)
            try:
                req = self.client.build_request("POST", rep.base + path, json=payload)
                r = await self.client.send(req, stream=True)
            except RESEND as e:
                self.pool.release(rep)
                why = f"{type(e).__name__}: {e}"
                if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
                    self.pool.fail(rep, why)  # refused: out of rotation; a closed one may be fine
                failed.append(f"{rep.url} ({why})")
                if not isinstance(e, httpx.ConnectError) and not queue and not resent:
                    queue, resent = [rep], True  # the last replica: once more, on a new connection
                log.warning("upstream replica %s did not take the request (%s); trying the "
                            "next", rep.url, why)  # fmt: skip
                continue
            except httpx.HTTPError as e:
                self.pool.release(rep)
                raise self.transport_error(e, rep.url) from None
            self.pool.recover(rep)
            ex.replica = rep
            return r
        raise APIError(
            502, "no upstream replica took the request: " + "; ".join(failed or ["none left"]),
            code="upstream_unreachable", type="server_error", headers={"retry-after": "2"},
        )  # fmt: skip

    def transport_error(self, e: httpx.HTTPError, url: str) -> APIError:
        if isinstance(e, httpx.TimeoutException):
            return APIError(
                504, f"the upstream {url} did not answer within "
                f"{self.settings.request_timeout:.0f}s ({type(e).__name__})",
                code="upstream_timeout", type="server_error",
            )  # fmt: skip
        return APIError(
            502, f"the upstream {url} failed: {type(e).__name__}: {e}",
            code="upstream_unreachable", type="server_error",
        )  # fmt: skip

    async def generate(
        self, request: Request, body: dict[str, Any], req: ChatRequest | CompletionRequest,
        *, chat: bool,
    ) -> Response:  # fmt: skip
        route = self._ready()
        if req.model is not None and not self._accepts(req.model, route):
            raise unknown_model(req.model, self.model_id)
        self._check_supported(req, chat)
        route = await self._enter()
        ex = Exchange(self, route, req, chat)
        payload = {**body, "model": route.upstream_model}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        headers = {VERSION_HEADER: route.version, "x-lmloop-model": str(self.model_id)}
        if req.stream:
            payload["stream_options"] = {**(body.get("stream_options") or {}),
                                         "include_usage": True}  # fmt: skip
        try:
            r = await self._send(ex, path, payload)
        except APIError:
            self.exit(None)
            raise
        if not req.stream:
            try:
                await r.aread()
            except httpx.HTTPError as e:
                raise self.transport_error(e, ex.replica.url if ex.replica else "?") from None
            finally:
                await r.aclose()
                self.exit(ex.replica)
            if r.status_code >= 400:
                raise status_error(r)
            try:
                data = r.json()
                choices = data["choices"]
            except (ValueError, KeyError, TypeError):
                raise APIError(
                    502, f"the upstream sent an answer that is not OpenAI's: {r.text[:200]}",
                    code="upstream_error", type="server_error",
                ) from None  # fmt: skip
            for c in choices:
                ex.absorb(c, whole=True)
            ex.first_at = time.perf_counter()
            await ex.finish_exchange(data.get("usage"))
            return JSONResponse(ex.rewrite(data), headers=headers)
        if r.status_code >= 400:
            try:
                await r.aread()
            finally:
                await r.aclose()
                self.exit(ex.replica)
            raise status_error(r)
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        return StreamingResponse(ex.relay(r), media_type="text/event-stream", headers=headers)
