"""OpenAI's response bodies: whole answers, SSE stream events, logprobs, model cards.

`ResponseBuilder` turns a `Job`'s StepOutputs into `chat.completion` / `text_completion` objects,
either whole (`collect`) or as server-sent events (`stream`), with logprobs in OpenAI's two
formats (chat's `content` list, the legacy completions' parallel arrays). Each choice is recorded
in the feedback store before the client sees its end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from lmloop.engine.params import SamplingParams, StepOutput, TokenLogprob
from lmloop.server.errors import APIError
from lmloop.server.generation import Job, record_answer
from lmloop.server.protocol import ChatRequest, CompletionRequest, params_record
from lmloop.server.slot import Served

# Characters str.splitlines() (and clients that split a stream with it, httpx's iter_lines among
# them) treat as line ends, which json.dumps(ensure_ascii=False) leaves raw: a sampled token
# holding one cut an event in two. Escaped, the JSON is the same.
_LINE_ENDS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def sse_data(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON on a single line."""
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_ENDS)}\n\n"


def model_card(s: Served) -> dict[str, Any]:
    return {
        "id": s.model_id,
        "object": "model",
        "created": int(s.loaded_at),
        "owned_by": "lmloop",
        "model_version": s.version,
        "context_length": s.context_length,
        "kind": getattr(s.loaded, "kind", None),
    }


class ResponseBuilder:
    """Turns a job's StepOutputs into OpenAI response objects (whole or as SSE chunks)."""

    def __init__(
        self,
        job: Job,
        req: ChatRequest | CompletionRequest,
        prompts: list[tuple[list[int], list[dict]]],
        maxes: list[int],
        params: list[SamplingParams],
    ):
        self.job = job
        self.req = req
        self.prompts = prompts
        self.maxes = maxes
        self.params = params
        n_choices = len(prompts) * req.n
        self.texts = [[] for _ in range(n_choices)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n_choices)]
        self.finish: list[str | None] = [None] * n_choices
        self.completion_tokens = [0] * n_choices
        self.prompt_tokens = sum(len(ids) for ids, _ in prompts)
        self.echo = bool(getattr(req, "echo", False))
        self.prompt_logprobs: list[list[TokenLogprob | None] | None] = [None] * n_choices
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

    def _absorb(self, i: int, out: StepOutput | None) -> None:
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
            if out.finish_reason == "error":  # its text stays in the log: it names internals
                raise self.job.engine_failed(i, out.error)
            self.finish[i] = out.finish_reason or "stop"

    async def _finalize(self) -> None:
        # Record every choice before the client sees the end, so feedback can follow at once.
        job, s, n = self.job, self.served, self.req.n
        model = (s.model_id, s.version, str(getattr(s.loaded, "sha256", "")))
        for k in range(len(self.texts)):
            ids, conv = self.prompts[k // n]
            await record_answer(
                job.state, job.rid if k == 0 else f"{job.rid}-{k}", conv, "".join(self.texts[k]),
                model=model, params=params_record(self.req, self.maxes[k // n]),
                tokens=(len(ids), self.completion_tokens[k]), t0=job.t0, chat=job.chat,
            )  # fmt: skip
        job.observe(self.prompt_tokens, list(self.completion_tokens))

    # ---- whole response ----
    async def collect(self) -> dict[str, Any]:
        async for i, out in self.job.events():
            self._absorb(i, out)
        await self._finalize()
        choices = []
        for k in range(len(self.texts)):
            text = "".join(self.texts[k])
            if self.job.chat:
                part = {"message": {"role": "assistant", "content": text}}
                lps = self._chat_logprobs(self.logprobs[k])
            else:
                part = {"text": self._echo_text(k) + text if self.echo else text}
                lps = self._completion_logprobs(self.logprobs[k], k if self.echo else None)
            choices.append({"index": k, **part, "logprobs": lps, "finish_reason": self.finish[k]})
        obj = "chat.completion" if self.job.chat else "text_completion"
        return {"object": obj, **self._common(), "choices": choices, "usage": self._usage()}

    # ---- streaming ----
    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if self.job.chat else "text_completion"
        common = self._common()

        def sse(choices: list[dict], usage: Any = None) -> str:
            data = {"object": obj, **common, "choices": choices}
            if include_usage:
                data["usage"] = usage
            return sse_data(data)

        if self.job.chat:  # the role comes first, as OpenAI sends it
            role = {"role": "assistant", "content": ""}
            yield sse([{"index": k, "delta": role, "logprobs": None, "finish_reason": None}
                       for k in range(len(self.texts))])  # fmt: skip
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
                    part = {"delta": {"content": text} if text or not finished else {}}
                    lps = self._chat_logprobs(new_lps) if new_lps else None
                else:
                    part, lps = {"text": text}, None
                    if new_lps or echo is not None:
                        lps = self._completion_logprobs(new_lps, echo)
                choice = {"index": i, **part, "logprobs": lps, "finish_reason": None}
                if finished:
                    if text or new_lps or echo is not None:
                        yield sse([choice])
                    end = {"delta": {}} if self.job.chat else {"text": ""}
                    choice = {"index": i, **end, "logprobs": None, "finish_reason": self.finish[i]}
                yield sse([choice])
        except APIError as e:
            # Headers are gone; an error mid-stream is sent as an error event, as OpenAI does.
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        await self._finalize()
        if include_usage:
            yield sse([], self._usage())
        yield "data: [DONE]\n\n"

    # ---- logprobs in OpenAI's two formats ----
    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
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
        self, lps: list[TokenLogprob], echo: int | None = None
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


def _lp_entry(lp: TokenLogprob) -> tuple[str, float, dict[str, float]]:
    top = {t: v for t, _id, v in lp.top}
    top.setdefault(lp.token, lp.logprob)
    return lp.token, lp.logprob, top
