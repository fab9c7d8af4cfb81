"""The HTTP routes: the OpenAI API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`),
`/health`, `/metrics`, `POST /admin/reload` and the chat page at `/`.

A completion request is parsed (lmloop.server.protocol) and handed to the app's backend
(lmloop.server.backend): `EngineBackend` here, lmloop's own engine, turns it into prompts and
sampling settings, runs it as one `Job` on the served engine (lmloop.server.generation) and
answers whole or streamed (lmloop.server.responses); `lmloop.server.upstream` forwards it to
another server instead. The model version a request acquired serves it to the end,
whatever a reload does meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from lmloop.errors import UserError
from lmloop.server.backend import SnapshotRow
from lmloop.server.errors import APIError, unknown_model
from lmloop.server.generation import Job, queue_full
from lmloop.server.metrics import CONTENT_TYPE, RESIDENT
from lmloop.server.protocol import (
    ChatRequest,
    CompletionRequest,
    choice_count,
    parse_chat,
    parse_completion,
    prepare,
    read_json_body,
)
from lmloop.server.responses import ResponseBuilder, model_card
from lmloop.server.slot import ModelSlot, Served
from lmloop.server.state import ServerState

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
VERSION_HEADER = "x-lmloop-model-version"


def add_routes(app: FastAPI, state: ServerState) -> None:
    """The OpenAI routes, the health and metrics endpoints, admin reload and the chat page."""
    settings = state.settings

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = state.backend.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": state.backend.cards()})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        return JSONResponse(state.backend.card(model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json_body(request, settings.max_body_bytes)
        req = parse_chat(body)
        return await state.backend.generate(request, body, req, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json_body(request, settings.max_body_bytes)
        req = parse_completion(body)
        return await state.backend.generate(request, body, req, chat=False)

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        if not settings.api_key:
            # Loading any path (or a hub id) on request is only for a caller who proved a key.
            raise APIError(
                403,
                "admin calls need a server started with --api-key (or LMLOOP_API_KEY)",
                code="admin_disabled",
            )
        if state.slot is None:
            raise APIError(
                400,
                "this server generates through an upstream; promotions reach it through the "
                "registry (--upstream-reload)",
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


class EngineBackend:
    """The local engine behind the routes (lmloop.server.backend.Backend): the app's
    `ModelSlot`, loaded in the background, following the registry, drained on shutdown."""

    def __init__(self, state: ServerState, slot: ModelSlot):
        self.state = state
        self.slot = slot

    @property
    def spec(self) -> str:
        return self.slot.spec

    async def start(self) -> None:
        self.state.tasks.append(asyncio.create_task(self._load()))

    async def _load(self) -> None:
        slot = self.slot
        try:
            await asyncio.to_thread(slot.load)
        except Exception as e:  # noqa: BLE001 - reported through /health and the CLI
            msg = e.line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            slot.error = msg
            log.error("could not load model %s: %s", slot.spec, msg)
            if self.state.on_load_failure is not None:
                self.state.on_load_failure(msg)
            return
        if slot.registry_version() is not None:
            poll = self.state.settings.registry_poll
            self.state.tasks.append(asyncio.create_task(slot.follow_registry(poll)))

    async def stop(self) -> None:
        # uvicorn has already waited for in-flight responses (timeout_graceful_shutdown);
        # what remains is stopped here, off the event loop.
        await asyncio.to_thread(self.slot.shutdown, self.state.settings.drain_timeout)

    def health(self) -> tuple[int, dict[str, Any]]:
        slot = self.slot
        if slot.error is not None:
            return 503, {"status": "error", "error": slot.error}
        cur = slot.current
        if cur is None:
            return 503, {"status": "loading"}
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
            return 503, body
        return 200, body

    def cards(self) -> list[dict[str, Any]]:
        return [model_card(_ready(self.state))]

    def card(self, model_id: str) -> dict[str, Any]:
        cur = _ready(self.state)
        if not cur.accepts(model_id):
            raise unknown_model(model_id, cur.model_id)
        return model_card(cur)

    async def generate(
        self, request: Request, body: dict[str, Any], req: ChatRequest | CompletionRequest,
        *, chat: bool,
    ) -> Response:  # fmt: skip
        state = self.state
        cur = _ready(state)
        if req.model is not None and not cur.accepts(req.model):
            raise unknown_model(req.model, cur.model_id)
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
            # Admission first: the request's sequences (prompts x n) are counted against the queue
            # before anything is built for them, so a body of 60,000 prompts costs a count.
            admit(served, choice_count(req))
            # Tokenizing and the per-choice settings run off the event loop: the streams already
            # running keep getting their tokens meanwhile.
            prompts, maxes, params = await asyncio.to_thread(
                prepare, served, req, state.settings.default_max_tokens
            )
            job = Job(state, served, request, chat)
            # choice k = prompt k // n, sample k % n (OpenAI's order for several prompts)
            job.submit([p for p, _ in prompts for _ in range(req.n)], params)
        except BaseException:
            release()
            raise
        ctx = ResponseBuilder(job, req, prompts, maxes, params)
        headers = {VERSION_HEADER: served.version, "x-lmloop-model": served.model_id}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def chunks() -> AsyncIterator[str]:
                try:
                    async for chunk in ctx.stream(include_usage):
                        yield chunk
                finally:
                    release()

            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            return StreamingResponse(chunks(), media_type="text/event-stream", headers=headers)
        try:
            result = await _until_disconnect(request, ctx.collect(), job)
        finally:
            release()
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result, headers=headers)

    def snapshot(self) -> list[SnapshotRow]:
        cur = self.slot.current
        rows = []
        for s in self.slot.all_served():
            try:
                running, waiting = int(s.engine.num_running), int(s.engine.num_waiting)
                counts = dict(s.engine.prefill_counts())
                counts.update({RESIDENT + k: v for k, v in s.engine.resident_bytes().items()})
            except Exception:  # noqa: BLE001 - a stopped engine reports nothing
                running = waiting = 0
                counts = {}
            rows.append((s.model_id, s.version, running, waiting, s is cur, counts))
        return rows

    def serving_version(self) -> str | None:
        cur = self.slot.current
        return cur.version if cur is not None else None

    def registry_name(self) -> str | None:
        return self.slot.registry_name()

    def status(self) -> dict[str, Any] | None:
        return None


def _ready(state: ServerState) -> Served:
    cur = state.slot.current
    if cur is None:
        msg = state.slot.error or "the model is still loading; retry shortly"
        raise APIError(503, msg, code="model_not_ready", headers={"retry-after": "2"})
    return cur


def admit(served: Served, count: int) -> None:
    """Refuse a request of `count` sequences the engine's queue cannot take now: 400 when it
    could never fit (more than the queue holds), 429 when the queue has no room for it yet."""
    engine = served.engine
    cap = int(engine.max_waiting)
    if count > cap:
        raise APIError(
            400,
            f"this request asks for {count} sequences (prompts x n); this server queues at "
            f"most {cap} at once: send fewer prompts or a smaller n",
            code="too_many_sequences",
        )
    if count > cap - int(engine.num_waiting):
        raise queue_full()


async def _until_disconnect(
    request: Request, coro: Coroutine[Any, Any, dict[str, Any]], job: Job
) -> dict[str, Any] | None:
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
