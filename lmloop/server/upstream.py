"""`lmloop serve --upstream URL`: the routes' generation forwarded to an OpenAI-compatible server.

    lmloop serve --model registry:mine --upstream http://127.0.0.1:8080 --upstream-model base

`UpstreamBackend` is the second `lmloop.server.backend.Backend`: the routes parse and validate a
request as they do for the local engine (same 400s), then it goes to the upstream with the
model name the upstream knows. One pooled `httpx.AsyncClient` per server carries every call.

- Streams are relayed event by event as they arrive (no buffering): each event's `id`, `model`,
  `model_version` and `system_fingerprint` are lmloop's, the rest is the upstream's.
  The upstream is always asked for usage (`stream_options.include_usage`) so the metrics count
  tokens; a client that did not ask for it does not get it.
- Every answer is recorded in the feedback store under lmloop's response id with
  `model_name` = the upstream model that wrote it and `model_version` = the registry version that
  model maps to (plus the upstream URL in `params`), before the client receives its end.
- `echo` and `logprobs` go through when the upstream honours them. What it ignores (probed at
  start, and noticed on any answer) is refused with 400 `unsupported_by_upstream`.
- The upstream's own errors come back with its status and message (401/403, which mean lmloop's
  `--upstream-key` is wrong, as 502); an unreachable upstream is 502, one slower than
  `--request-timeout` 504. A stream the upstream breaks off ends with an SSE error event.
- Which model name and version label new requests get is the `Route`; a promotion
  (lmloop.server.promotion) replaces it only once the new version answered a health prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmloop.errors import UserError
from lmloop.registry import Registry, split_spec
from lmloop.server.backend import SnapshotRow
from lmloop.server.errors import APIError
from lmloop.server.generation import record_answer
from lmloop.server.promotion import HEALTH_PROMPT, Promoter, Route
from lmloop.server.protocol import ChatRequest, CompletionRequest, params_record
from lmloop.server.responses import sse_data
from lmloop.server.state import ServerState
from lmloop.server.upstream_config import UpstreamSpec

log = logging.getLogger(__name__)

VERSION_HEADER = "x-lmloop-model-version"


# ---- start-up checks (synchronous: `lmloop serve` runs them before it binds) -------------------


def auth_headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def insecure_warning(url: str) -> str | None:
    """A warning for plain http to a host that is not this machine (keys and prompts travel
    readable), else None."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return None
    host = parts.hostname or ""
    if host == "localhost":
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return None
    return (
        f"the upstream {url} is plain http to another host: prompts, answers and "
        "--upstream-key travel unencrypted (use https, or a private network)"
    )


def upstream_models(spec: UpstreamSpec, key: str | None, timeout: float = 5.0) -> list[str]:
    """The model ids the upstream lists at `GET /v1/models`; UserError when it does not answer."""
    url = spec.base_url + "/v1/models"
    try:
        r = httpx.get(url, headers=auth_headers(key), timeout=timeout)
    except httpx.HTTPError as e:
        raise UserError(
            f"the upstream {spec.upstream} does not answer ({type(e).__name__}: {e or 'no reply'})",
            hint="start it first, or check --upstream",
        ) from None
    return models_from(spec, r)


def models_from(spec: UpstreamSpec, r: httpx.Response) -> list[str]:
    if r.status_code in (401, 403):
        raise UserError(
            f"the upstream {spec.upstream} refused the key ({r.status_code})",
            hint="set --upstream-key (or LMLOOP_UPSTREAM_KEY)",
        )
    try:
        r.raise_for_status()
        data = r.json()["data"]
        return [str(m["id"]) for m in data]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"the upstream {spec.upstream} did not answer GET /v1/models as an "
            f"OpenAI-compatible server ({r.status_code}: {str(e)[:120]})"
        ) from None


def pick_model(spec: UpstreamSpec, ids: list[str], wanted: str | None) -> str:
    """The upstream model to send requests to: `wanted` if listed, else the only one listed."""
    have = ", ".join(ids) or "none"
    if wanted is not None:
        if wanted not in ids:
            raise UserError(
                f"the upstream {spec.upstream} lists no model '{wanted}'; it has: {have}",
                hint="pick one with --upstream-model",
            )
        return wanted
    if len(ids) != 1:
        raise UserError(
            f"the upstream {spec.upstream} lists {len(ids)} models ({have}); "
            "choose one with --upstream-model"
        )
    return ids[0]


# ---- SSE ---------------------------------------------------------------------------------------


async def sse_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data` of each server-sent event, as soon as its blank line arrives. Split on bytes:
    a UTF-8 character never holds a newline byte, so no character is cut."""
    buf = b""
    data: list[bytes] = []
    async for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                if data:
                    yield b"\n".join(data).decode("utf-8", errors="replace")
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
    if data:  # the last event's blank line never came: the stream was cut
        raise httpx.RemoteProtocolError("the stream ended inside an event")


# ---- the backend -------------------------------------------------------------------------------


class UpstreamBackend:
    """Generation by an OpenAI-compatible upstream (lmloop.server.backend.Backend)."""

    def __init__(self, state: ServerState):
        self.state = state
        self.settings = state.settings
        self.up: UpstreamSpec = state.settings.upstream
        self.spec = state.settings.model or ""
        self.key = self.up.upstream_key
        self.client: httpx.AsyncClient | None = None
        self.route: Route | None = None
        self.model_id: str | None = None
        self.error: str | None = None
        self.inflight = 0
        self.waiting = 0
        self.open = asyncio.Event()  # cleared while a promotion restarts the upstream
        self.open.set()
        self.unsupported: set[str] = set()  # "logprobs", "chat_logprobs", "echo"
        self.promoter = Promoter(self)
        self.started_at = time.time()

    # -- life cycle --
    async def start(self) -> None:
        timeout = httpx.Timeout(self.settings.request_timeout, connect=10.0)
        self.client = httpx.AsyncClient(
            base_url=self.up.base_url,
            headers=auth_headers(self.key),
            timeout=timeout,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )
        self.state.tasks.append(asyncio.create_task(self._connect()))

    async def _connect(self) -> None:
        try:
            ids = models_from(self.up, await self.client.get("/v1/models"))
            model = pick_model(self.up, ids, self.up.upstream_model)
            version, sha = await asyncio.to_thread(self._registry_version, model)
        except (UserError, httpx.HTTPError) as e:
            msg = e.line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.error = msg
            log.error("upstream not usable: %s", msg)
            if self.state.on_load_failure is not None:
                self.state.on_load_failure(msg)
            return
        self.model_id = self.settings.model_name or self.registry_name() or model
        self.route = Route(model, version, sha)
        await self._probe()
        log.info(
            "serving %s through %s (upstream model %s, version %s)",
            self.model_id, self.up.upstream, model, version,
        )  # fmt: skip
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

    async def _probe(self) -> None:
        """Find out which of `logprobs` and `echo` the upstream honours (one token each)."""
        route = self.route
        assert route is not None and self.client is not None
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
                r = await self.client.post(path, json=body)
                good = r.status_code < 400 and ok(r.json()["choices"][0])
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError):
                good = False
            if not good:
                self.unsupported.add(what)
        if self.unsupported:
            log.info("the upstream does not honour: %s", ", ".join(sorted(self.unsupported)))

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
            "url": self.up.upstream,
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
            "upstream": self.up.upstream,
            "upstream_model": route.upstream_model,
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
            raise self._unknown(model_id)
        return self.cards()[0]

    def _unknown(self, name: str) -> APIError:
        return APIError(
            404,
            f"the model '{name[:200]}' does not exist; this server serves '{self.model_id}'",
            param="model",
            code="model_not_found",
        )

    def snapshot(self) -> list[SnapshotRow]:
        route = self.route
        if route is None or self.model_id is None:
            return []
        return [(self.model_id, route.version, self.inflight, self.waiting, True, {})]

    # -- generation --
    def _check_supported(self, req: ChatRequest | CompletionRequest, chat: bool) -> None:
        asks = []
        if chat and req.logprobs:
            asks.append(("chat_logprobs", "logprobs"))
        if not chat and req.logprobs is not None:
            asks.append(("logprobs", "logprobs"))
        if not chat and req.echo:
            asks.append(("echo", "echo"))
        for what, param in asks:
            if what in self.unsupported:
                raise self.unsupported_error(param)

    def unsupported_error(self, param: str) -> APIError:
        model = self.route.upstream_model if self.route else "?"
        return APIError(
            400,
            f"the upstream ({model} at {self.up.upstream}) does not honour '{param}', so this "
            f"server cannot answer it; send the request without '{param}'",
            param=param,
            code="unsupported_by_upstream",
        )

    async def _enter(self) -> Route:
        """Wait while a promotion restarts the upstream, then count the request in."""
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

    def exit(self) -> None:
        self.inflight -= 1

    async def drain(self, timeout: float) -> None:
        """Stop taking requests (they wait) and let those in flight finish within `timeout`."""
        self.open.clear()
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def transport_error(self, e: httpx.HTTPError) -> APIError:
        if isinstance(e, httpx.TimeoutException):
            return APIError(
                504, f"the upstream {self.up.upstream} did not answer within "
                f"{self.settings.request_timeout:.0f}s ({type(e).__name__})",
                code="upstream_timeout", type="server_error",
            )  # fmt: skip
        return APIError(
            502, f"the upstream {self.up.upstream} is unreachable: {type(e).__name__}: {e}",
            code="upstream_unreachable", type="server_error",
        )  # fmt: skip

    def status_error(self, r: httpx.Response) -> APIError:
        try:
            err = r.json().get("error")
            msg = err.get("message") if isinstance(err, dict) else err
            code = err.get("code") if isinstance(err, dict) else None
            param = err.get("param") if isinstance(err, dict) else None
        except (ValueError, AttributeError):
            msg, code, param = None, None, None
        msg = str(msg or r.text[:500] or r.reason_phrase)
        status = r.status_code
        if status in (401, 403):  # lmloop's own key to the upstream: not the client's fault
            return APIError(
                502, f"the upstream refused lmloop's --upstream-key ({status}): {msg}",
                code="upstream_auth", type="server_error",
            )  # fmt: skip
        if status < 400 or status > 599:
            status = 502
        headers = {"retry-after": r.headers["retry-after"]} if "retry-after" in r.headers else None
        return APIError(
            status, f"upstream: {msg}", code=code if isinstance(code, str) else None,
            param=param if isinstance(param, str) else None, headers=headers,
        )  # fmt: skip

    async def generate(
        self, request: Request, body: dict[str, Any], req: ChatRequest | CompletionRequest,
        *, chat: bool,
    ) -> Response:  # fmt: skip
        route = self._ready()
        if req.model is not None and not self._accepts(req.model, route):
            raise self._unknown(req.model)
        self._check_supported(req, chat)
        route = await self._enter()
        ex = Exchange(self, route, req, chat)
        payload = {**body, "model": route.upstream_model}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        headers = {VERSION_HEADER: route.version, "x-lmloop-model": str(self.model_id)}
        assert self.client is not None
        if not req.stream:
            try:
                r = await self.client.post(path, json=payload)
            except httpx.HTTPError as e:
                raise self.transport_error(e) from None
            finally:
                self.exit()
            if r.status_code >= 400:
                raise self.status_error(r)
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

        payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        try:
            r = await self.client.send(self.client.build_request("POST", path, json=payload),
                                       stream=True)  # fmt: skip
        except httpx.HTTPError as e:
            self.exit()
            raise self.transport_error(e) from None
        if r.status_code >= 400:
            try:
                await r.aread()
            finally:
                await r.aclose()
                self.exit()
            raise self.status_error(r)
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        return StreamingResponse(ex.relay(r), media_type="text/event-stream", headers=headers)


class Exchange:
    """One request through the upstream: its choices' text as it passes, then the record."""

    def __init__(
        self, backend: UpstreamBackend, route: Route, req: ChatRequest | CompletionRequest,
        chat: bool,
    ):  # fmt: skip
        self.b = backend
        self.route = route
        self.req = req
        self.chat = chat
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.t0 = time.perf_counter()
        self.first_at: float | None = None
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def rewrite(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj["id"] = self.rid
        obj["model"] = self.b.model_id
        obj["model_version"] = self.route.version
        obj["system_fingerprint"] = f"lmloop-{self.route.version}"
        return obj

    def absorb(self, c: dict[str, Any], *, whole: bool) -> None:
        """One choice (whole answer) or one chunk's choice; 400 for what the upstream ignored."""
        i = int(c.get("index", 0))
        if self.chat:
            part = c.get("message" if whole else "delta") or {}
            text = part.get("content") or ""
        else:
            text = c.get("text") or ""
        if text or whole:
            self._check_honoured(c, text, first=not self.texts.get(i))
        self.texts.setdefault(i, []).append(text)
        if c.get("finish_reason") is not None:
            self.finish[i] = c["finish_reason"]

    def _check_honoured(self, c: dict[str, Any], text: str, *, first: bool) -> None:
        req = self.req
        asked_lp = bool(req.logprobs) if self.chat else req.logprobs is not None
        if asked_lp and text and c.get("logprobs") is None:
            self.b.unsupported.add("chat_logprobs" if self.chat else "logprobs")
            raise self.b.unsupported_error("logprobs")
        if (not self.chat and req.echo and first and isinstance(req.prompt, str)
                and not text.startswith(req.prompt)):  # fmt: skip
            self.b.unsupported.add("echo")
            raise self.b.unsupported_error("echo")

    async def relay(self, r: httpx.Response) -> AsyncIterator[str]:
        """The upstream's events as they come, rewritten; recorded at `[DONE]`."""
        usage = None
        done = False
        try:
            async for data in sse_payloads(r.aiter_raw()):
                if data.strip() == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if not isinstance(obj, dict):
                    raise ValueError("an event that is not a JSON object")
                if "error" in obj and not obj.get("choices"):  # the upstream's own error event
                    yield sse_data(obj)
                    return
                choices = obj.get("choices") or []
                for c in choices:
                    self.absorb(c, whole=False)
                if self.first_at is None and any(self.texts.values()):
                    self.first_at = time.perf_counter()
                if obj.get("usage"):
                    usage = obj["usage"]
                if not self.include_usage:
                    obj.pop("usage", None)
                    if not choices:  # the usage event lmloop asked for, not the client
                        continue
                yield sse_data(self.rewrite(obj))
        except APIError as e:
            yield sse_data(e.body())
            return
        except (httpx.HTTPError, ValueError) as e:
            yield sse_data(self._broken(e).body())
            return
        finally:
            await r.aclose()
            self.b.exit()
        if not done and (not self.finish or None in self.finish.values()):
            yield sse_data(self._broken(None).body())
            return
        await self.finish_exchange(usage)
        yield "data: [DONE]\n\n"

    def _broken(self, e: Exception | None) -> APIError:
        why = f"{type(e).__name__}: {e}" if e is not None else "it closed the stream"
        log.warning("upstream broke off response %s: %s", self.rid, why)
        return APIError(
            502, f"the upstream {self.b.up.upstream} broke off the answer ({why})",
            code="upstream_disconnected", type="server_error",
        )  # fmt: skip

    async def finish_exchange(self, usage: dict[str, Any] | None) -> None:
        """Record every choice (before the client sees the end) and report the timings."""
        usage = usage or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        convs = self._conversations()
        per_prompt = max(1, len(self.texts) // max(1, len(convs)))
        one = len(self.texts) == 1
        for k in sorted(self.texts):
            await self._record(
                k, convs[min(k // per_prompt, len(convs) - 1)], "".join(self.texts[k]),
                prompt_tokens if len(convs) == 1 else 0, completion if one else 0,
            )  # fmt: skip
        ttft = None if self.first_at is None else self.first_at - self.t0
        counts = [completion] if one else [0] * len(self.texts)
        self.b.state.metrics.observe_request(
            str(self.b.model_id), self.route.version, prompt_tokens=prompt_tokens,
            completion_tokens=counts, ttft=ttft, total=time.perf_counter() - self.t0,
        )  # fmt: skip

    def _conversations(self) -> list[list[dict]]:
        req = self.req
        if isinstance(req, ChatRequest):
            conv = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages
            ]
            return [conv]
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [[{"role": "user", "content": p if isinstance(p, str) else json.dumps(p)}]
                for p in prompts]  # fmt: skip

    async def _record(self, index: int, conv: list[dict], text: str, prompt_tokens: int,
                      completion_tokens: int) -> None:  # fmt: skip
        store = self.b.state.store
        if store is None:
            return
        req = self.req
        if not self.chat and req.echo and text.startswith(conv[0]["content"]):
            text = text[len(conv[0]["content"]) :]  # the answer, not the prompt it echoed
        rid = self.rid if index == 0 else f"{self.rid}-{index}"
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        params = params_record(req, asked)  # type: ignore[arg-type] - None: the upstream's
        params.update(upstream=self.b.up.upstream, upstream_model=self.route.upstream_model)
        await record_answer(
            self.b.state, rid, conv, text,
            model=(self.route.upstream_model, self.route.version, self.route.sha256),
            params=params, tokens=(prompt_tokens, completion_tokens), t0=self.t0, chat=self.chat,
        )  # fmt: skip
