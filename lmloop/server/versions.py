"""`GET /v1/lmloop/versions`: the served registry name's versions and the gate's decisions, for
the chat page's versions panel (the body is in docs/serve.md).

Each row is `lmloop.registry.decisions.decision_row` plus `serving` (this server answers with
that version now) and `text` (the figures as the page shows them). Rolling back stays a command;
the server follows the registry's current version by polling (`ModelSlot.follow_registry`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from lmloop.errors import UserError
from lmloop.registry import Registry
from lmloop.registry.decisions import decision_cells, decision_rows
from lmloop.server.backend import Backend


def version_list(backend: Backend) -> dict[str, Any]:
    """The route's body (reads the registry: call it off the event loop)."""
    serving = backend.serving_version()
    name = backend.registry_name()
    body: dict[str, Any] = {"object": "list", "name": name, "serving": serving, "current": None,
                            "rollback": None, "reason": None, "data": []}  # fmt: skip
    status = backend.status()
    if status is not None:
        body["upstream"] = status
    if name is None:
        body["reason"] = (
            f"the served model ({backend.spec}) is not from the registry: serve "
            "--model registry:NAME to see its versions and the gate's decisions"
        )
        return body
    try:
        rows = decision_rows(Registry(), name)
    except UserError as e:
        body["reason"] = e.line()
        return body
    body["rollback"] = f"lmloop models rollback {name}"
    body["current"] = next((r["version"] for r in rows if r["current"]), None)
    body["data"] = [{**r, "serving": r["version"] == serving, "text": decision_cells(r)}
                    for r in rows]  # fmt: skip
    return body


def versions_router(backend: Backend) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/lmloop/versions")
    async def versions() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(version_list, backend))

    return router
