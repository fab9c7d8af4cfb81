"""What a caller asks of the engine (`SamplingParams`) and what it gets back (`StepOutput`).

Kept free of torch so request validation (the server, the CLI) stays cheap to import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmloop.errors import UserError

MAX_TOP_LOGPROBS = 20
# Below this temperature sampling is greedy: dividing logits by it overflows float32 (1e-300 turns
# every logit into inf and the softmax into NaN). vLLM draws the same line (`_SAMPLING_EPS`).
MIN_TEMPERATURE = 1e-5
# Beyond these a repetition penalty overflows or flattens float32 logits; 1 means off.
PENALTY_RANGE = (1e-2, 1e2)


class QueueFull(Exception):
    """The engine's waiting queue is full; the caller should retry later (HTTP 429/503)."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; 0: chosen token only; N: chosen + top-N
    # Each prompt token's logprob given the tokens before it (+ top-N), as vLLM's
    # `prompt_logprobs`: what `echo` scoring needs. With it, max_tokens may be 0 (score only).
    prompt_logprobs: int | None = None
    ignore_eos: bool = False  # benchmarks: do not stop at the tokenizer's stop ids

    def validate(self) -> SamplingParams:
        def bad(what: str, value: object, expected: str) -> UserError:
            return UserError(f"invalid {what}: {value!r}, expected {expected}")

        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise bad("max_tokens", self.max_tokens, f"an integer >= {least}")
        if self.max_tokens < least:
            raise bad("max_tokens", self.max_tokens, "an integer >= 1 (0 only to score a prompt)")
        for name in (
            "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty",
        ):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise bad(name, v, "a finite number")
        if not self.temperature >= 0:
            raise bad("temperature", self.temperature, "a number >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 means off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "a number in [0, 1]")
        lo, hi = PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise bad(
                "repetition_penalty", self.repetition_penalty, f"a number in [{lo}, {hi}] (1: off)"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2 <= v <= 2:
                raise bad(name, v, "a number in [-2, 2]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", self.stop, "non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP_LOGPROBS
            ):
                raise bad(name, v, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise bad("seed", self.seed, "an integer")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float  # under the model's own distribution (before temperature and penalties)
    top: list[tuple[str, int, float]]  # (token, id, logprob), most likely first


@dataclass
class StepOutput:
    text: str  # new whole characters since the previous output; may be ""
    token_ids: list[int]  # tokens sampled since the previous output (stop tokens included)
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # the reason, when finish_reason == "error"
    # On the first output when asked: one entry per prompt token, None for the first (nothing
    # before it predicts it), as vLLM returns them.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    """A whole generation: what the non-streaming callers get (the same stream, aggregated)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @classmethod
    def from_steps(cls, steps) -> Completion:
        text, ids, lps, plps = [], [], None, None
        last = None
        for s in steps:
            text.append(s.text)
            ids += s.token_ids
            if s.logprobs is not None:
                lps = (lps or []) + s.logprobs
            if s.prompt_logprobs is not None:
                plps = s.prompt_logprobs
            last = s
        if last is None:
            raise RuntimeError("the request produced no output")
        if last.finish_reason == "error":
            raise RuntimeError(f"generation failed: {last.error}")
        return cls(
            "".join(text), ids, lps, last.finish_reason, last.prompt_tokens,
            last.completion_tokens, plps,
        )  # fmt: skip
