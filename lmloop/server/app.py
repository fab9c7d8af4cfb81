"""The OpenAI-compatible HTTP API and the chat page: `create_app(settings)` -> FastAPI app.

    from lmloop.server import ServerSettings, create_app
    app = create_app(ServerSettings(model="smollm2-135m-instruct", db="feedback.db"))

The routes are in docs/serve.md. This module wires the app: settings, shared state (`state`),
routes, middlewares (`middleware`) and the lifespan that loads the model in the
background and drains it on shutdown. Every generation goes through the engine's worker thread,
so the event loop never runs the model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from lmloop.engine.memory import trim_heap
from lmloop.feedback.store import FeedbackStore
from lmloop.server.errors import install_error_handlers
from lmloop.server.feedback import feedback_router
from lmloop.server.middleware import (
    AccessLogMiddleware,
    APIKeyMiddleware,
    BodyLimitMiddleware,
    OriginCheckMiddleware,
)
from lmloop.server.routes import EngineBackend, add_routes
from lmloop.server.settings import ServerSettings
from lmloop.server.slot import ModelSlot
from lmloop.server.state import ServerState
from lmloop.server.upstream import UpstreamBackend
from lmloop.server.versions import versions_router

__all__ = ["ServerSettings", "create_app"]

log = logging.getLogger(__name__)

# Freed heap pages go back to the OS this often (seconds). Requests that allocate and free large
# blocks on several threads (echo scoring's logits, huge bodies, long prompts' tokens) otherwise
# leave glibc holding them: bench/soak.py's abusive clients raised resident memory 19-24% in a
# minute, levelling at their high-water mark; with this, about 5%.
TRIM_EVERY_S = 5.0


async def trim_every(seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(trim_heap)


def create_app(settings: ServerSettings, *, slot: ModelSlot | None = None) -> FastAPI:
    """The FastAPI app; the model loads in the background when the app starts (lifespan).
    With `settings.upstream.upstream` set, an upstream server generates instead
    (lmloop.server.upstream)."""
    if settings.upstream.upstream:
        state = ServerState(settings, None)
        state.backend = UpstreamBackend(state)
    else:
        slot = slot or ModelSlot(
            settings.model,
            model_id=settings.model_name or settings.model,
            engine=settings.engine,
            drain_timeout=settings.drain_timeout,
        )
        state = ServerState(settings, slot)
        state.backend = EngineBackend(state, slot)
    backend = state.backend

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.db is not None:
            state.store = FeedbackStore(settings.db)
        await backend.start()
        state.tasks.append(asyncio.create_task(trim_every(TRIM_EVERY_S)))
        try:
            yield
        finally:
            for t in state.tasks:
                t.cancel()
            await backend.stop()
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
    add_routes(app, state)

    app.include_router(feedback_router(state.require_store, max_body_bytes=settings.max_body_bytes))
    app.include_router(versions_router(backend))

    # Middleware: the last added runs first. CORS (only when asked) must answer preflights
    # before auth; the body cap runs after auth (or, keyless, after the origin check) so
    # strangers cannot make us buffer; the access log gives every answer its request id.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    else:  # a keyless server answers only its own origin (DNS rebinding, cross-site pages)
        allowed = [*settings.allowed_origins, *settings.cors_origins]
        app.add_middleware(OriginCheckMiddleware, allowed=allowed)
    app.add_middleware(AccessLogMiddleware, metrics=state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-api-key"],
        )
    return app
