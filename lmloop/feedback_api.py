"""`POST /v1/feedback`: what users say about an answer, recorded in the feedback store.

    curl -s localhost:8000/v1/feedback -H 'content-type: application/json' \
         -d '{"response_id": "chatcmpl-...", "thumb": "up", "reason": "clear"}'
    -> 200 {"id": "fb-...", "object": "feedback", "response_id": "chatcmpl-...", "created": 1764400000}

The body is a JSON object with `response_id` (the `id` a completion returned) and any of
`thumb` ("up"/"down"), `rating` (1-5), `flag` (true/false), `correction` (text), `preferred_over`
(the id of a sibling answer to the same conversation), `reason` (text). Unknown response ids
answer 404; anything malformed (invalid JSON, not an object, a wrong type or value, an unknown
key) answers 400, always in OpenAI's error shape `{"error": {"message", "type", "param",
"code"}}`. The body is parsed here rather than through a pydantic model so each of those cases
gets the right status and `param` instead of a generic 422.

`feedback_router(store_getter)` returns an APIRouter; the server mounts it (and applies its auth
around every route). The store call runs in the thread pool so concurrent posts are concurrent
writers, which the store serializes. Nothing about the client (no address) is stored.
This module never imports torch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from lmloop.errors import UserError
from lmloop.store import FeedbackStore, InvalidFeedback, UnknownResponse

log = logging.getLogger(__name__)

FIELDS = ("response_id", "thumb", "rating", "flag", "correction", "preferred_over", "reason")
MAX_BODY = 1 << 20  # 1 MiB: a correction is text, not a file


def _error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": kind.get(status, "server_error"),
                "param": param,
                "code": code,
            }
        },
        status_code=status,
    )


def feedback_router(store_getter: Callable[[], FeedbackStore]) -> APIRouter:
    """An APIRouter with `POST /v1/feedback` writing to the store `store_getter()` returns."""
    router = APIRouter()

    @router.post("/v1/feedback", response_model=None)
    async def post_feedback(request: Request) -> JSONResponse:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return _error(413, f"request body is {len(raw)} bytes, at most {MAX_BODY} are accepted")
        try:
            body: Any = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"request body is not valid JSON: {e}", code="invalid_json")
        if not isinstance(body, dict):
            return _error(
                400,
                f"request body must be a JSON object, got {type(body).__name__}",
                code="invalid_type",
            )
        unknown = [k for k in body if k not in FIELDS]
        if unknown:
            return _error(
                400,
                f"unknown field '{unknown[0]}'; expected any of {', '.join(FIELDS)}",
                param=unknown[0],
                code="unknown_parameter",
            )
        rid = body.get("response_id")
        if rid is None:
            return _error(
                400, "missing required field 'response_id'", param="response_id",
                code="missing_required_parameter",
            )  # fmt: skip
        if not isinstance(rid, str) or not rid.strip():
            return _error(
                400, f"'response_id' must be a non-empty string, got {rid!r}",
                param="response_id", code="invalid_type",
            )  # fmt: skip
        kwargs = {k: body[k] for k in FIELDS[1:] if body.get(k) is not None}
        try:
            store = store_getter()
            fid = await run_in_threadpool(store.add_feedback, rid, **kwargs)
        except UnknownResponse as e:
            return _error(404, e.message, param=e.param, code="response_not_found")
        except InvalidFeedback as e:
            return _error(400, e.message, param=e.param, code="invalid_value")
        except UserError as e:
            return _error(400, e.message, code="invalid_value")
        return JSONResponse(
            {"id": fid, "object": "feedback", "response_id": rid, "created": int(time.time())}
        )

    return router
