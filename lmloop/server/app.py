"""The OpenAI-compatible HTTP API and the chat page: `create_app(settings)` -> FastAPI app.

    from lmloop.server import ServerSettings, create_app
    app = create_app(ServerSettings(model="smollm2-135m-instruct", db="feedback.db"))
    # uvicorn.run(app, host="127.0.0.1", port=8000)  -- what `lmloop serve` does

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (SSE streaming
when `stream` is true), `POST /v1/feedback` (lmloop.server.feedback), `POST /admin/reload`,
`GET /health`, `GET /metrics`, and the chat page at `GET /`.

Every generation goes through the engine's continuous batching: the handler submits the prompt
to the engine's worker thread and awaits its outputs, so the event loop never runs the model.
Non-streaming answers aggregate the same stream the streaming ones send (one decode path).
Every answer names the model version that wrote it (`model_version`, `system_fingerprint`, the
`x-lmloop-model-version` header), and is recorded in the feedback store under its response id
before the client receives the end of it, so feedback can follow immediately.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from lmloop.errors import UserError
from lmloop.server.auth import APIKeyMiddleware
from lmloop.server.errors import APIError, install_error_handlers
from lmloop.server.feedback import feedback_router
from lmloop.server.metrics import CONTENT_TYPE, ServerMetrics
from lmloop.server.protocol import (
    ChatRequest,
    CompletionRequest,
    parse_chat,
    parse_completion,
    read_json_body,
)
from lmloop.server.slot import ModelSlot, Served, outputs

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
VERSION_HEADER = "x-lmloop-model-version"


@dataclass
class ServerSettings:
    """Everything `create_app` needs; `lmloop serve` fills it from its ServeConfig."""

    model: str
    model_name: str | None = None  # the id the API reports; default: `model` as given
    db: str | Path | None = None  # feedback database; None: do not record (tests of the app)
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0  # seconds a generation may run before it is cut off
    default_max_tokens: int = 512  # when a request gives none (capped by the context left)
    max_batch: int = 16
    max_waiting: int = 64
    max_len: int | None = None
    drain_timeout: float = 30.0  # graceful shutdown / retired engines: finish within this
    registry_poll: float = 5.0  # seconds between checks of a `registry:NAME` model's current
    cors_origins: list[str] = field(default_factory=list)
    int8: bool = False  # int8 weights for faster CPU decode (the engine's option)
    int4: bool = False  # 4-bit block weights in the C kernel (the engine's option)
    kv_int8: bool | None = None  # int8 KV cache (None: with int8 weights; the engine's option)
    prefix_cache_mb: float = 256.0  # the engine's prefix cache (0: off)


class _State:
    def __init__(self, settings: ServerSettings, slot: ModelSlot):
        self.settings = settings
        self.slot = slot
        self.store: Any = None
        self.metrics = ServerMetrics(self._snapshot)
        self.on_load_failure: Any = None  # callable(str), set by `lmloop serve` to exit
        self.tasks: list[asyncio.Task] = []

    def _snapshot(self) -> list[tuple[str, str, int, int, bool, dict[str, int]]]:
        cur = self.slot.current
        rows = []
        for s in self.slot.all_served():
            try:
                running, waiting = int(s.engine.num_running), int(s.engine.num_waiting)
                counts = dict(s.engine.prefill_counts())
            except Exception:  # noqa: BLE001 - a stopped engine reports nothing
                running = waiting = 0
                counts = {}
            rows.append((s.model_id, s.version, running, waiting, s is cur, counts))
        return rows


def create_app(settings: ServerSettings, *, slot: ModelSlot | None = None) -> FastAPI:
    """The FastAPI app; the model loads in the background when the app starts (lifespan)."""
    slot = slot or ModelSlot(
        settings.model,
        model_id=settings.model_name or settings.model,
        engine_kw={
            "max_batch": settings.max_batch,
            "max_waiting": settings.max_waiting,
            "max_len": settings.max_len,
            "int8": settings.int8,
            "int4": settings.int4,
            "kv_int8": settings.kv_int8,
            "prefix_cache_mb": settings.prefix_cache_mb,
        },
        drain_timeout=settings.drain_timeout,
    )
    state = _State(settings, slot)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.db is not None:
            from lmloop.feedback.store import FeedbackStore

            state.store = FeedbackStore(settings.db)
        state.tasks.append(asyncio.create_task(_load(state)))
        try:
            yield
        finally:
            for t in state.tasks:
                t.cancel()
            # uvicorn has already waited for in-flight responses (timeout_graceful_shutdown);
            # what remains is stopped here, off the event loop.
            await asyncio.to_thread(slot.shutdown, settings.drain_timeout)
            if state.store is not None:
                state.store.close()

    app = FastAPI(
        title="lmloop",
        lifespan=lifespan,
        docs_url=None,  # no extra public surface: the OpenAI API is the documentation
        redoc_url=None,
        openapi_url=None,
    )
    app.state.lmloop = state
    install_error_handlers(app)
    _routes(app, state)

    app.include_router(
        feedback_router(lambda: _require_store(state), max_body_bytes=settings.max_body_bytes)
    )

    # Middleware: the last added runs first. CORS (only when asked) must answer preflights
    # before auth; the body cap runs after auth so strangers cannot make us buffer.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(AccessLogMiddleware, metrics=state.metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-api-key"],
        )
    return app


def _require_store(state: _State) -> Any:
    if state.store is None:
        raise APIError(503, "this server records no feedback (started without a database)")
    return state.store


async def _load(state: _State) -> None:
    slot = state.slot
    try:
        await asyncio.to_thread(slot.load)
    except Exception as e:  # noqa: BLE001 - reported through /health and the CLI
        msg = e.line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        slot.error = msg
        log.error("could not load model %s: %s", slot.spec, msg)
        if state.on_load_failure is not None:
            state.on_load_failure(msg)
        return
    if slot.registry_version() is not None:
        state.tasks.append(asyncio.create_task(slot.follow_registry(state.settings.registry_poll)))


# ---- middleware --------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for bodies over the cap, whether announced (Content-Length) or streamed (chunked)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max(8 * max_bytes, 8 << 20)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
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
            await _send_error(send, _too_large(self.max_bytes))
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
            await _send_error(send, _too_large(self.max_bytes))
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"request body too large: the limit is {max_bytes} bytes", code="request_too_large"
    )


# Characters str.splitlines() (and clients that split a stream with it, httpx's iter_lines among
# them) treat as line ends, which json.dumps(ensure_ascii=False) leaves raw: a sampled token
# holding one cut an event in two. Escaped, the JSON is the same.
_LINE_ENDS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def sse_data(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON on a single line."""
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_ENDS)}\n\n"


async def _send_error(send: Any, err: APIError) -> None:
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
    "/admin/reload",
    "/health",
    "/metrics",
    "/",
}


class AccessLogMiddleware:
    """One log line per request (method, path, status, time; never the client address) and the
    per-route request counter."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0

        async def send_wrapper(message: dict) -> None:
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


# ---- routes ------------------------------------------------------------------------------------


def _routes(app: FastAPI, state: _State) -> None:
    settings = state.settings

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        slot = state.slot
        if slot.error is not None:
            return JSONResponse({"status": "error", "error": slot.error}, status_code=503)
        cur = slot.current
        if cur is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        engine = cur.engine
        body = {
            "status": "ok",
            "model": cur.model_id,
            "model_version": cur.version,
            "running": int(engine.num_running),
            "waiting": int(engine.num_waiting),
        }
        if not engine.alive:  # the worker thread died, or has work but stopped stepping
            body["status"] = "engine not running or stalled"
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        cur = _ready(state)
        return JSONResponse({"object": "list", "data": [_model_card(cur)]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        cur = _ready(state)
        if not cur.accepts(model_id):
            raise _unknown_model(model_id, cur)
        return JSONResponse(_model_card(cur))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json_body(request, settings.max_body_bytes)
        req = parse_chat(body)
        return await _serve(state, request, req, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json_body(request, settings.max_body_bytes)
        req = parse_completion(body)
        return await _serve(state, request, req, chat=False)

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        if not settings.api_key:
            # Loading any path (or a hub id) on request is only for a caller who proved a key.
            raise APIError(
                403,
                "admin calls need a server started with --api-key (or LMLOOP_API_KEY)",
                code="admin_disabled",
            )
        body = await read_json_body(request, settings.max_body_bytes)
        spec = body.get("model", state.slot.spec)
        name = body.get("name")
        if not isinstance(spec, str) or not spec.strip():
            raise APIError(400, "'model' must be a model spec string", param="model")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise APIError(400, "'name' must be a non-empty string", param="name")
        previous = state.slot.current
        try:
            served = await asyncio.to_thread(state.slot.load, spec, model_id=name)
        except UserError as e:
            raise APIError(400, f"reload failed: {e.line()}", param="model") from None
        except Exception as e:  # noqa: BLE001 - the old version keeps serving
            log.exception("reload of %s failed", spec)
            raise APIError(400, f"reload failed: {type(e).__name__}: {e}", param="model") from None
        return JSONResponse(
            {
                "object": "reload",
                "model": served.model_id,
                "model_version": served.version,
                "previous_version": previous.version if previous else None,
            }
        )


def _ready(state: _State) -> Served:
    cur = state.slot.current
    if cur is None:
        msg = state.slot.error or "the model is still loading; retry shortly"
        raise APIError(503, msg, code="model_not_ready", headers={"retry-after": "2"})
    return cur


def _model_card(s: Served) -> dict[str, Any]:
    return {
        "id": s.model_id,
        "object": "model",
        "created": int(s.loaded_at),
        "owned_by": "lmloop",
        "model_version": s.version,
        "context_length": s.context_length,
        "kind": getattr(s.loaded, "kind", None),
    }


def _unknown_model(name: str, cur: Served) -> APIError:
    return APIError(
        404,
        f"the model '{name[:200]}' does not exist; this server serves '{cur.model_id}'",
        param="model",
        code="model_not_found",
    )


# ---- generation --------------------------------------------------------------------------------


class _Job:
    """One API request's choices running in the engine, merged into one ordered event stream."""

    def __init__(self, state: _State, served: Served, request: Request, chat: bool):
        self.state = state
        self.served = served
        self.request = request
        self.chat = chat
        self.handles: list[Any] = []
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def submit(self, prompts: list[list[int]], params: list[Any]) -> None:
        from lmloop.engine import QueueFull

        try:
            for ids, p in zip(prompts, params):
                self.handles.append(self.served.engine.submit(ids, p))
        except QueueFull:
            self.cancel()
            raise APIError(
                429,
                "the server is at capacity (request queue full); retry shortly",
                code="rate_limit_exceeded",
                type="rate_limit_exceeded",
                headers={"retry-after": "1"},
            ) from None
        except UserError as e:
            self.cancel()
            code = "context_length_exceeded" if "context" in e.message else "invalid_value"
            raise APIError(400, e.line(), code=code) from None

    def cancel(self) -> None:
        for h in self.handles:
            with contextlib.suppress(Exception):
                h.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, StepOutput) as they come; None as the output when time ran out."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle: Any) -> None:
            try:
                async for out in outputs(handle):
                    await queue.put((i, out))
            finally:
                await queue.put((i, _END))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        live = len(tasks)
        deadline = self.t0 + self.state.settings.request_timeout
        try:
            while live:
                remaining = deadline - time.perf_counter()
                try:
                    i, out = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0.001))
                except asyncio.TimeoutError:
                    log.warning("request %s hit the %.0fs timeout", self.rid, remaining)
                    self.cancel()
                    for j in range(len(tasks)):
                        yield j, None
                    return
                if out is _END:
                    live -= 1
                    continue
                if self.first_token_at is None and out.token_ids:
                    self.first_token_at = time.perf_counter()
                yield i, out
        finally:
            self.cancel()  # a no-op for finished requests; frees the batch slots otherwise
            for t in tasks:
                t.cancel()

    def observe(self, prompt_tokens: int, completion_tokens: list[int]) -> None:
        ttft = None if self.first_token_at is None else self.first_token_at - self.t0
        self.state.metrics.observe_request(
            self.served.model_id,
            self.served.version,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft=ttft,
            total=time.perf_counter() - self.t0,
        )

    async def record(
        self,
        index: int,
        messages: list[dict],
        text: str,
        params: dict,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        store = self.state.store
        if store is None:
            return
        rid = self.rid if index == 0 else f"{self.rid}-{index}"
        try:
            await asyncio.to_thread(
                store.record_exchange,
                messages=messages,
                response_text=text,
                response_id=rid,
                model_name=self.served.model_id,
                model_version=self.served.version,
                checkpoint_sha=str(getattr(self.served.loaded, "sha256", "")),
                params=params,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_ms=(time.perf_counter() - self.t0) * 1000,
                kind="chat" if self.chat else "completion",
            )
        except Exception as e:  # noqa: BLE001 - a store failure must not fail the answer
            log.error("could not record response %s: %s", rid, e)


_END = object()


def _sampling(req: ChatRequest | CompletionRequest, max_tokens: int, index: int) -> Any:
    from lmloop.engine import SamplingParams

    prompt_logprobs = None
    if isinstance(req, ChatRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
        if req.echo and (logprobs is not None or max_tokens == 0):
            prompt_logprobs = logprobs or 0
    seed = None if req.seed is None else (req.seed + index) % (2**63)
    p = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        stop=list(req.stop or []),
        seed=seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    try:
        return p.validate()
    except UserError as e:
        raise APIError(400, e.line(), code="invalid_value") from None


def _params_record(req: ChatRequest | CompletionRequest, max_tokens: int) -> dict[str, Any]:
    keys = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty")
    out = {k: getattr(req, k) for k in keys}
    out.update(max_tokens=max_tokens, seed=req.seed, stop=list(req.stop or []), n=req.n)
    return out


def _prompts(served: Served, req: ChatRequest | CompletionRequest) -> list[tuple[list[int], list]]:
    """[(prompt ids, conversation to record)] — one per prompt (a completion may send several)."""
    tok = served.tokenizer
    if isinstance(req, ChatRequest):
        conv = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        if _encoder_decoder(served):  # the last user turn is the encoder's input
            try:
                return [(served.engine.encode_chat(conv), conv)]
            except UserError as e:
                raise APIError(400, e.line(), param="messages") from None
        try:
            text = tok.apply_chat_template(conv, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a model's template may reject a conversation
            raise APIError(
                400, f"the model's chat template rejected the messages: {e}", param="messages"
            ) from None
        return [(tok.encode(text), conv)]
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompt = [prompt]  # one prompt of token ids
    out = []
    for p in [prompt] if isinstance(prompt, str) else prompt:
        if isinstance(p, list):  # token ids
            vocab = tok.vocab_size
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(
                    400, f"token id {bad} in 'prompt' is outside the vocabulary [0, {vocab})",
                    param="prompt",
                )  # fmt: skip
            out.append((list(p), [{"role": "user", "content": tok.decode(list(p))}]))
            continue
        ids = served.engine.encode_prompt(p)  # as `lmloop generate` encodes a plain prompt
        if not ids:
            raise APIError(400, "'prompt' is empty: give at least one token", param="prompt")
        out.append((ids, [{"role": "user", "content": p}]))
    return out


def _encoder_decoder(served: Served) -> bool:
    return bool(getattr(served.engine, "encoder_decoder", False))


def _max_tokens(state: _State, served: Served, req: Any, n_prompt: int) -> int:
    ctx = served.context_length
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if _encoder_decoder(served):  # input and output each get the whole context
        if n_prompt > ctx or (asked or 0) > ctx:
            raise _context_error(ctx, n_prompt, asked or 1, encoder_decoder=True)
        return min(state.settings.default_max_tokens, ctx) if asked is None else asked
    if asked is None:
        if n_prompt >= ctx:
            raise _context_error(ctx, n_prompt, 1)
        return min(state.settings.default_max_tokens, ctx - n_prompt)
    if n_prompt + asked > ctx:
        raise _context_error(ctx, n_prompt, asked)
    return asked


def _context_error(ctx: int, n_prompt: int, asked: int, encoder_decoder: bool = False) -> APIError:
    if encoder_decoder:
        return APIError(
            400,
            f"This model's maximum context length is {ctx} tokens for the input and {ctx} for "
            f"the completion. However, you requested {n_prompt} tokens in the prompt and "
            f"{asked} for the completion. Please reduce the prompt or the maximum number of "
            "tokens to generate.",
            param="messages",
            code="context_length_exceeded",
        )
    return APIError(
        400,
        f"This model's maximum context length is {ctx} tokens. However, you requested "
        f"{n_prompt + asked} tokens ({n_prompt} in the prompt, {asked} for the completion). "
        "Please reduce the prompt or the maximum number of tokens to generate.",
        param="messages",
        code="context_length_exceeded",
    )


async def _serve(state: _State, request: Request, req: Any, *, chat: bool) -> Response:
    cur = _ready(state)
    if req.model is not None and not cur.accepts(req.model):
        raise _unknown_model(req.model, cur)
    served = state.slot.acquire()
    if served is None:
        raise APIError(503, "the model is not loaded", code="model_not_ready")
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            state.slot.release(served)

    try:
        prompts = _prompts(served, req)
        maxes = [_max_tokens(state, served, req, len(ids)) for ids, _ in prompts]
        job = _Job(state, served, request, chat)
        # choice k = prompt k // n, sample k % n (OpenAI's order for several prompts)
        choice_prompts = [p for p, _ in prompts for _ in range(req.n)]
        choice_max = [m for m in maxes for _ in range(req.n)]
        params = [_sampling(req, m, k % req.n) for k, m in enumerate(choice_max)]
        job.submit(choice_prompts, params)
    except BaseException:
        release()
        raise
    ctx = _Context(job, req, prompts, maxes, params)
    headers = {VERSION_HEADER: served.version, "x-lmloop-model": served.model_id}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in ctx.stream(include_usage):
                    yield chunk
            finally:
                release()

        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
    try:
        result = await _until_disconnect(request, ctx.collect(), job)
    finally:
        release()
    if result is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return JSONResponse(result, headers=headers)


async def _until_disconnect(request: Request, coro: Any, job: _Job) -> Any:
    """Run `coro`, cancelling it (and the generation) if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                return None
    finally:
        if not task.done():
            task.cancel()


class _Context:
    """Turns a job's StepOutputs into OpenAI response objects (whole or as SSE chunks)."""

    def __init__(self, job: _Job, req: Any, prompts: list, maxes: list[int], params: list):
        self.job = job
        self.req = req
        self.prompts = prompts
        self.maxes = maxes
        self.params = params
        n_choices = len(prompts) * req.n
        self.texts = [[] for _ in range(n_choices)]
        self.logprobs: list[list[Any]] = [[] for _ in range(n_choices)]
        self.finish: list[str | None] = [None] * n_choices
        self.completion_tokens = [0] * n_choices
        self.prompt_tokens = sum(len(ids) for ids, _ in prompts)
        self.echo = bool(getattr(req, "echo", False))
        self.prompt_logprobs: list[Any] = [None] * n_choices
        self.echoed = [False] * n_choices

    @property
    def served(self) -> Served:
        return self.job.served

    def _common(self) -> dict[str, Any]:
        return {
            "id": self.job.rid,
            "created": self.job.created,
            "model": self.served.model_id,
            "system_fingerprint": self.served.fingerprint,
            "model_version": self.served.version,
        }

    def _usage(self) -> dict[str, int]:
        c = sum(self.completion_tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": c,
            "total_tokens": self.prompt_tokens + c,
        }

    def _absorb(self, i: int, out: Any) -> None:
        if out is None:  # request timeout
            if self.finish[i] is None:
                self.finish[i] = "length"
            return
        self.texts[i].append(out.text)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[i] = out.prompt_logprobs
        if out.logprobs:
            self.logprobs[i].extend(out.logprobs)
        self.completion_tokens[i] = out.completion_tokens
        if out.finished:
            if out.finish_reason == "error":
                raise APIError(
                    500, f"generation failed: {out.error or 'engine error'}", code="engine_error"
                )
            self.finish[i] = out.finish_reason or "stop"

    async def _finalize(self) -> None:
        # Record every choice before the client sees the end, so feedback can follow at once.
        n = self.req.n
        for k in range(len(self.texts)):
            _, conv = self.prompts[k // n]
            await self.job.record(
                k,
                conv,
                "".join(self.texts[k]),
                _params_record(self.req, self.maxes[k // n]),
                len(self.prompts[k // n][0]),
                self.completion_tokens[k],
            )
        self.job.observe(self.prompt_tokens, list(self.completion_tokens))

    # ---- whole response ----
    async def collect(self) -> dict[str, Any]:
        async for i, out in self.job.events():
            self._absorb(i, out)
        await self._finalize()
        choices = []
        for k in range(len(self.texts)):
            text = "".join(self.texts[k])
            if self.job.chat:
                choice = {
                    "index": k,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self._chat_logprobs(self.logprobs[k]),
                    "finish_reason": self.finish[k],
                }
            else:
                choice = {
                    "index": k,
                    "text": self._echo_text(k) + text if self.echo else text,
                    "logprobs": self._completion_logprobs(
                        self.logprobs[k], k if self.echo else None
                    ),
                    "finish_reason": self.finish[k],
                }
            choices.append(choice)
        obj = "chat.completion" if self.job.chat else "text_completion"
        return {"object": obj, **self._common(), "choices": choices, "usage": self._usage()}

    # ---- streaming ----
    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if self.job.chat else "text_completion"
        common = self._common()

        def sse(choices: list[dict], usage: Any = None, with_usage: bool = False) -> str:
            data = {"object": obj, **common, "choices": choices}
            if with_usage:
                data["usage"] = usage
            return sse_data(data)

        if self.job.chat:  # the role comes first, as OpenAI sends it
            yield sse(
                [
                    {
                        "index": k,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for k in range(len(self.texts))
                ],
                None,
                include_usage,
            )
        try:
            async for i, out in self.job.events():
                if self.finish[i] is not None:  # a timeout after this choice had finished
                    continue
                self._absorb(i, out)
                new_lps = out.logprobs if out is not None and out.logprobs else []
                text = out.text if out is not None else ""
                echo = None  # the prompt goes out first, in the choice's first chunk
                if self.echo and out is not None and not self.echoed[i]:
                    self.echoed[i], echo = True, i
                    text = self._echo_text(i) + text
                finished = self.finish[i] is not None
                if not text and not new_lps and not finished:
                    continue
                if self.job.chat:
                    delta = {"content": text} if text or not finished else {}
                    choice = {
                        "index": i,
                        "delta": delta,
                        "logprobs": self._chat_logprobs(new_lps) if new_lps else None,
                        "finish_reason": None,
                    }
                else:
                    lps = None
                    if new_lps or echo is not None:
                        lps = self._completion_logprobs(new_lps, echo)
                    choice = {"index": i, "text": text, "logprobs": lps, "finish_reason": None}
                if finished:
                    if text or new_lps or echo is not None:
                        yield sse([choice], None, include_usage)
                    if self.job.chat:
                        choice = {"index": i, "delta": {}, "logprobs": None}
                    else:
                        choice = {"index": i, "text": "", "logprobs": None}
                    choice["finish_reason"] = self.finish[i]
                yield sse([choice], None, include_usage)
        except APIError as e:
            # Headers are gone; an error mid-stream is sent as an error event, as OpenAI does.
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        await self._finalize()
        if include_usage:
            yield sse([], self._usage(), True)
        yield "data: [DONE]\n\n"

    # ---- logprobs in OpenAI's two formats ----
    def _chat_logprobs(self, lps: list[Any]) -> dict[str, Any] | None:
        if self.params[0].logprobs is None:
            return None
        return {
            "content": [
                {
                    "token": lp.token,
                    "logprob": lp.logprob,
                    "bytes": list(lp.token.encode("utf-8")),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                        for t, _id, v in lp.top
                    ],
                }
                for lp in lps
            ],
            "refusal": None,
        }

    def _echo_text(self, k: int) -> str:
        """The prompt of choice k as echoed: the text sent, or the token ids decoded."""
        return self.prompts[k // self.req.n][1][0]["content"]

    def _completion_logprobs(
        self, lps: list[Any], echo: int | None = None
    ) -> dict[str, Any] | None:
        """OpenAI's legacy logprobs. `top_logprobs` holds the top N and the chosen token (up to
        N+1 entries, as OpenAI documents); with `echo` (a choice index) the prompt's tokens come
        first, the first one with null logprobs, as vLLM returns them."""
        if self.params[0].logprobs is None:
            return None
        entries: list[tuple[str, float | None, dict[str, float] | None]] = []
        if echo is not None:
            ids = self.prompts[echo // self.req.n][0]
            plps = self.prompt_logprobs[echo] or [None] * len(ids)
            decode = self.served.engine.decode_ids
            for tid, lp in zip(ids, plps):
                entries.append((decode([tid]), None, None) if lp is None else _lp_entry(lp))
        entries += [_lp_entry(lp) for lp in lps]
        offsets, pos = [], 0
        for token, _, _ in entries:
            offsets.append(pos)
            pos += len(token)
        return {
            "tokens": [e[0] for e in entries],
            "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries],
            "text_offset": offsets,
        }


def _lp_entry(lp: Any) -> tuple[str, float, dict[str, float]]:
    top = {t: v for t, _id, v in lp.top}
    top.setdefault(lp.token, lp.logprob)
    return lp.token, lp.logprob, top
