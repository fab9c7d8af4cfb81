"""Request bodies of the OpenAI API: reading, size cap, JSON, and typed validation.

`read_json_body` turns raw bytes into a dict or raises `APIError` (413 over the cap, 400 for a
wrong content type, invalid UTF-8, invalid JSON, NaN/Infinity or a non-object body).
`parse_chat` / `parse_completion` validate the dict with pydantic in strict mode (a string is
not a number, a bool is not an integer) and range-check every sampling value the way OpenAI
does, answering 400 with the offending field in `param`. Unknown fields are ignored, as OpenAI
clients send fields this server does not implement (`user`, `metadata`, ...).

A parsed request then becomes what the engine takes: `prompt_ids` (token ids per prompt, and
the conversation to record), `max_tokens_for` (checked against the context) and
`sampling_params` (one `SamplingParams` per choice).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmloop.engine.params import SamplingParams
from lmloop.errors import UserError
from lmloop.server.errors import APIError, too_large
from lmloop.server.slot import Served
from lmloop.tokenizer import Tokenizer

MAX_N = 8  # choices per request: each is a separate sequence in the batch


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object, enforcing content type, size cap and strict UTF-8."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(
            400,
            f"expected Content-Type application/json, got '{ctype[:80] or 'none'}'",
            code="invalid_content_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise too_large(max_bytes)
        except ValueError:
            raise APIError(400, "invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:  # a lying or missing Content-Length (chunked upload)
            raise too_large(max_bytes)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        msg = str(e) if isinstance(e, ValueError) else "nested too deeply"
        raise APIError(400, f"the request body is not valid JSON: {msg[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_kind(body)}")
    # A `\ud800` escape decodes to a lone surrogate: not text any tokenizer can take. Only an
    # escape makes one (the bytes were strict UTF-8), so a body without `\ud` is not walked
    # again (a 0.8 MB body: 6 ms of the event loop).
    if "\\ud" in text or "\\uD" in text:
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except RecursionError:  # parsed just under the limit, too deep to walk again
            raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
        except UnicodeEncodeError:
            raise APIError(
                400, "the request body holds an invalid \\u escape (lone surrogate)"
            ) from None
    return body


def json_kind(v: Any) -> str:
    """What a parsed JSON value is, in JSON's words (for messages that must not echo it)."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return kinds.get(type(v), "null" if v is None else "a number")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    # `developer` is OpenAI's newer name for `system`; tools are not supported.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    max_tokens: int | None = Field(None, ge=0)  # 0: with `echo`, score the prompt only
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False  # the answer starts with the prompt (and its logprobs), as vLLM does

    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: a text, or one list of token ids, is a single prompt."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else p


def _parse(cls: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        # A union reports each branch in `loc`; keep the field path, drop the branch names.
        path = [x for x in loc if not any(c in x for c in "[]'") and x not in ("str", "int")]
        msg = err.get("msg", "invalid value")
        where = ".".join(path)
        if err.get("type") == "missing":
            msg = f"'{where}' is required"
        elif where:
            msg = f"invalid value for '{where}': {msg}"
        raise APIError(400, msg, param=where or None, code="invalid_value") from None


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    if "messages" in body and isinstance(body["messages"], list) and not body["messages"]:
        raise APIError(400, "'messages' must hold at least one message", param="messages")
    req = _parse(ChatRequest, body)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    if not any(m.role == "user" for m in req.messages):
        raise APIError(400, "'messages' must contain a user message", param="messages")
    return req


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    req = _parse(CompletionRequest, body)
    if isinstance(req.prompt, list) and (
        not req.prompt or any(isinstance(p, list) and not p for p in req.prompt)
    ):
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(
            400, "'max_tokens' must be at least 1 (0 only with 'echo', to score the prompt)",
            param="max_tokens", code="invalid_value",
        )  # fmt: skip
    return req


# ---- a parsed request -> the engine's prompts and sampling settings ----------------------------


def sampling_params(
    req: ChatRequest | CompletionRequest, max_tokens: int, index: int
) -> SamplingParams:
    """The engine's sampling settings for choice `index` of a request (its seed is offset by the
    index, so the choices differ yet repeat); 400 for a combination the engine refuses."""
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


def choice_count(req: ChatRequest | CompletionRequest) -> int:
    """The sequences a request asks for (prompts x n), counted on the parsed body alone."""
    return req.n * (len(req.prompts()) if isinstance(req, CompletionRequest) else 1)


def prepare(
    served: Served, req: ChatRequest | CompletionRequest, default_max_tokens: int
) -> tuple[list[tuple[list[int], list[dict]]], list[int], list[SamplingParams]]:
    """(prompts, max_tokens per prompt, sampling settings per choice) for an admitted request:
    the tokenizing and building a server runs off its event loop (`asyncio.to_thread`)."""
    prompts = prompt_ids(served, req)
    maxes = [max_tokens_for(req, served, len(ids), default_max_tokens) for ids, _ in prompts]
    n = req.n
    # choice k = prompt k // n, sample k % n (OpenAI's order for several prompts)
    params = [sampling_params(req, maxes[k // n], k % n) for k in range(len(prompts) * n)]
    return prompts, maxes, params


def params_record(req: ChatRequest | CompletionRequest, max_tokens: int) -> dict[str, Any]:
    keys = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty")
    out = {k: getattr(req, k) for k in keys}
    out.update(max_tokens=max_tokens, seed=req.seed, stop=list(req.stop or []), n=req.n)
    return out


def prompt_ids(
    served: Served, req: ChatRequest | CompletionRequest
) -> list[tuple[list[int], list[dict]]]:
    """[(prompt ids, conversation to record)] — one per prompt (a completion may send several)."""
    tok = served.tokenizer
    if isinstance(req, ChatRequest):
        conv = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        if served.engine.encoder_decoder:  # the last user turn is the encoder's input
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
        _refuse_longer_than_context(tok, text, served.context_length, "messages")
        return [(tok.encode(text), conv)]
    out = []
    ctx = served.context_length
    for p in req.prompts():
        if isinstance(p, list):  # token ids
            if len(p) > ctx:  # before any work on it
                raise _context_error(ctx, len(p), 0, served.engine.encoder_decoder, "prompt")
            vocab = tok.vocab_size
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(
                    400, f"token id {bad} in 'prompt' is outside the vocabulary [0, {vocab})",
                    param="prompt",
                )  # fmt: skip
            out.append((list(p), [{"role": "user", "content": tok.decode(list(p))}]))
            continue
        _refuse_longer_than_context(tok, p, ctx, "prompt")
        ids = served.engine.encode_prompt(p)  # as `lmloop generate` encodes a plain prompt
        if not ids:
            raise APIError(400, "'prompt' is empty: give at least one token", param="prompt")
        if len(ids) > ctx:  # refused at once, before the next prompt is tokenized
            raise _context_error(ctx, len(ids), 0, served.engine.encoder_decoder, "prompt")
        out.append((ids, [{"role": "user", "content": p}]))
    return out


def max_tokens_for(
    req: ChatRequest | CompletionRequest, served: Served, n_prompt: int, default_max_tokens: int
) -> int:
    """Tokens to generate for a prompt of `n_prompt` tokens: the request's, or the default
    capped by the context left; 400 (context_length_exceeded) when they do not fit."""
    ctx = served.context_length
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if served.engine.encoder_decoder:  # input and output each get the whole context
        if n_prompt > ctx or (asked or 0) > ctx:
            raise _context_error(ctx, n_prompt, asked or 1, encoder_decoder=True)
        return min(default_max_tokens, ctx) if asked is None else asked
    if asked is None:
        if n_prompt >= ctx:
            raise _context_error(ctx, n_prompt, 1)
        return min(default_max_tokens, ctx - n_prompt)
    if n_prompt + asked > ctx:
        raise _context_error(ctx, n_prompt, asked)
    return asked


def _refuse_longer_than_context(tok: Tokenizer, text: str, ctx: int, param: str) -> None:
    """400 before tokenizing a text sure to hold more tokens than the context
    (`Tokenizer.min_tokens`); a text of at most `ctx` characters never does."""
    at_least = tok.min_tokens(text) if len(text) > ctx else 0
    if at_least > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your prompt has at "
            f"least {at_least} tokens (one per word at the least). Please reduce the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def _context_error(
    ctx: int, n_prompt: int, asked: int, encoder_decoder: bool = False, param: str = "messages"
) -> APIError:
    if encoder_decoder:
        return APIError(
            400,
            f"This model's maximum context length is {ctx} tokens for the input and {ctx} for "
            f"the completion. However, you requested {n_prompt} tokens in the prompt and "
            f"{asked} for the completion. Please reduce the prompt or the maximum number of "
            "tokens to generate.",
            param=param,
            code="context_length_exceeded",
        )
    return APIError(
        400,
        f"This model's maximum context length is {ctx} tokens. However, you requested "
        f"{n_prompt + asked} tokens ({n_prompt} in the prompt, {asked} for the completion). "
        "Please reduce the prompt or the maximum number of tokens to generate.",
        param=param,
        code="context_length_exceeded",
    )
