"""One request through an upstream replica (`lmloop serve --upstream`): its answer relayed and
recorded.

- Streams are relayed event by event as they arrive (no buffering): each event's `id`, `model`,
  `model_version` and `system_fingerprint` are lmloop's, the rest is the upstream's. The
  upstream is always asked for usage (`stream_options.include_usage`) so the metrics count
  tokens; a client that did not ask for it does not get it.
- Every answer is recorded in the feedback store under lmloop's response id with `model_name` =
  the upstream model that wrote it and `model_version` = the registry version that model is
  (plus the URL of the replica that answered in `params`), before the client receives its end.
- What the upstream ignores (`logprobs`, `echo`), noticed on an answer, is refused with 400.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from lmloop.server.errors import APIError
from lmloop.server.generation import record_answer
from lmloop.server.promotion import Route
from lmloop.server.protocol import ChatRequest, CompletionRequest, params_record
from lmloop.server.responses import sse_data
from lmloop.server.routing import Replica

if TYPE_CHECKING:
    from lmloop.server.upstream import UpstreamBackend

log = logging.getLogger(__name__)


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


def status_error(r: httpx.Response) -> APIError:
    """An upstream's error answer as lmloop's (its status and message; 401/403 as 502)."""
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


class Exchange:
    """One request through a replica: its choices' text as it passes, then the record."""

    def __init__(
        self, backend: UpstreamBackend, route: Route, req: ChatRequest | CompletionRequest,
        chat: bool,
    ):  # fmt: skip
        self.b = backend
        self.route = route
        self.replica: Replica | None = None  # the one that answers, once the request is sent
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
            self.b.exit(self.replica)
        if not done and (not self.finish or None in self.finish.values()):
            yield sse_data(self._broken(None).body())
            return
        await self.finish_exchange(usage)
        yield "data: [DONE]\n\n"

    def _url(self) -> str:
        return self.replica.url if self.replica is not None else self.b.up.shown

    def _broken(self, e: Exception | None) -> APIError:
        why = f"{type(e).__name__}: {e}" if e is not None else "it closed the stream"
        log.warning("upstream broke off response %s: %s", self.rid, why)
        return APIError(
            502, f"the upstream {self._url()} broke off the answer ({why})",
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
        return [[{"role": "user", "content": p if isinstance(p, str) else json.dumps(p)}]
                for p in req.prompts()]  # fmt: skip

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
        params.update(upstream=self._url(), upstream_model=self.route.upstream_model)
        await record_answer(
            self.b.state, rid, conv, text,
            model=(self.route.upstream_model, self.route.version, self.route.sha256),
            params=params, tokens=(prompt_tokens, completion_tokens), t0=self.t0, chat=self.chat,
        )  # fmt: skip
