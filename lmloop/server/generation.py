"""One API request's generation: its choices submitted to the engine, their outputs merged.

A `Job` submits every choice of a request to the served engine's continuous batching, yields
their `StepOutput`s in the order they come (cutting all of them off at the request timeout),
reports the request's timings to the metrics, and records each answer in the feedback store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from lmloop.engine.core import RequestHandle
from lmloop.engine.params import QueueFull, SamplingParams, StepOutput
from lmloop.errors import UserError
from lmloop.server.errors import APIError, internal_error, request_id
from lmloop.server.slot import Served
from lmloop.server.state import ServerState

log = logging.getLogger(__name__)

_END = object()  # a choice's outputs are done


def queue_full() -> APIError:
    """429: the engine's queue has no room for a request now."""
    return APIError(
        429,
        "the server is at capacity (request queue full); retry shortly",
        code="rate_limit_exceeded",
        type="rate_limit_exceeded",
        headers={"retry-after": "1"},
    )


class Job:
    """One API request's choices running in the engine, merged into one ordered event stream."""

    def __init__(self, state: ServerState, served: Served, request: Request, chat: bool):
        self.state = state
        self.served = served
        self.chat = chat
        self.handles: list[RequestHandle] = []
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.request_id = request_id(request)  # the HTTP request's (x-request-id), for the log
        self.created = int(time.time())

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        try:
            for ids, p in zip(prompts, params):
                self.handles.append(self.served.engine.submit(ids, p))
        except QueueFull:
            self.cancel()
            raise queue_full() from None
        except UserError as e:
            self.cancel()
            code = "context_length_exceeded" if "context" in e.message else "invalid_value"
            raise APIError(400, e.line(), code=code) from None

    def engine_failed(self, i: int, error: str | None) -> APIError:
        """Choice i ended in an engine error: logged under the request id (with the engine's
        request number, whose traceback the engine logged), answered without its text."""
        engine_id = self.handles[i].id if i < len(self.handles) else "?"
        log.error(
            "request %s (%s): generation failed in engine request %s: %s",
            self.request_id, self.rid, engine_id, error or "engine error",
        )  # fmt: skip
        return internal_error(self.request_id, "generation failed")

    def cancel(self) -> None:
        for h in self.handles:
            with contextlib.suppress(Exception):
                h.cancel()

    async def events(self) -> AsyncIterator[tuple[int, StepOutput | None]]:
        """(choice index, StepOutput) as they come; None as the output when time ran out."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle: RequestHandle) -> None:
            try:
                async for out in handle:
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
                    log.warning(
                        "request %s hit the %.0f s timeout (--request-timeout)",
                        self.rid,
                        self.state.settings.request_timeout,
                    )
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


async def record_answer(
    state: ServerState, rid: str, messages: list[dict], text: str, *,
    model: tuple[str, str | None, str], params: dict, tokens: tuple[int, int], t0: float,
    chat: bool,
) -> None:  # fmt: skip
    """One answer into the feedback store (off the event loop), under `model` = (name,
    registry version, checkpoint sha): what the engine and the upstream backends both record.
    A store failure is logged; it never fails the answer."""
    store = state.store
    if store is None:
        return
    try:
        await asyncio.to_thread(
            store.record_exchange,
            messages=messages,
            response_text=text,
            response_id=rid,
            model_name=model[0],
            model_version=model[1],
            checkpoint_sha=model[2],
            params=params,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            latency_ms=(time.perf_counter() - t0) * 1000,
            kind="chat" if chat else "completion",
        )
    except Exception as e:  # noqa: BLE001 - a store failure must not fail the answer
        log.error("could not record response %s: %s", rid, e)
