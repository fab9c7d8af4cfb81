"""`POST /v1/feedback`: what users say about an answer, recorded in the feedback store.

The body and answers are in docs/feedback.md. The body goes through the OpenAI routes' reader
(`read_json_body`: content type, `--max-body-bytes`, UTF-8, NaN, nesting depth, lone
surrogates), then each field's JSON type is checked here (so a wrong type is named without
echoing the value) and its value by the store (`add_feedback`). The store call runs in the
thread pool so concurrent posts are concurrent writers, which the store serializes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from lmloop.errors import UserError
from lmloop.feedback.store import FeedbackStore, InvalidFeedback, UnknownResponse
from lmloop.server.errors import APIError
from lmloop.server.protocol import json_kind, read_json_body

log = logging.getLogger(__name__)

# field -> (JSON type, how to name it)
FIELDS: dict[str, tuple[type, str]] = {
    "response_id": (str, "a string"),
    "thumb": (str, 'a string ("up" or "down")'),
    "rating": (int, "an integer from 1 to 5"),
    "flag": (bool, "true or false"),
    "correction": (str, "a string"),
    "preferred_over": (str, "a string"),
    "reason": (str, "a string"),
}


def feedback_router(
    store_getter: Callable[[], FeedbackStore], *, max_body_bytes: int = 1 << 20
) -> APIRouter:
    """`POST /v1/feedback` writing to `store_getter()`; errors are `APIError`s, answered by the
    handlers `lmloop.server.errors.install_error_handlers` puts on the app."""
    router = APIRouter()

    @router.post("/v1/feedback", response_model=None)
    async def post_feedback(request: Request) -> JSONResponse:
        body = await read_json_body(request, max_body_bytes)
        unknown = [k for k in body if k not in FIELDS]
        if unknown:
            raise APIError(
                400,
                f"unknown field '{unknown[0][:100]}'; expected any of {', '.join(FIELDS)}",
                param=unknown[0][:100],
                code="unknown_parameter",
            )
        for key, value in body.items():
            want, name = FIELDS[key]
            if value is not None and (
                isinstance(value, bool) != (want is bool) or not isinstance(value, want)
            ):
                raise APIError(
                    400, f"'{key}' must be {name}, got {json_kind(value)}", param=key,
                    code="invalid_type",
                )  # fmt: skip
        rid = body.get("response_id")
        if rid is None:
            raise APIError(
                400, "missing required field 'response_id'", param="response_id",
                code="missing_required_parameter",
            )  # fmt: skip
        kwargs = {k: body[k] for k in FIELDS if k != "response_id" and body.get(k) is not None}
        try:
            store = store_getter()
            fid = await run_in_threadpool(store.add_feedback, rid, **kwargs)
        except UnknownResponse as e:
            raise APIError(404, e.message, param=e.param, code="response_not_found") from None
        except InvalidFeedback as e:
            raise APIError(400, e.message, param=e.param, code="invalid_value") from None
        except UserError as e:
            raise APIError(400, e.message, code="invalid_value") from None
        return JSONResponse(
            {"id": fid, "object": "feedback", "response_id": rid, "created": int(time.time())}
        )

    return router
