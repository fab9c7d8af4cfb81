"""`lmloop generate` and `lmloop chat`: text from any model lmloop can load, on lmloop's engine.

    lmloop generate --model smollm2-135m-instruct --prompt "Once upon a time" --max-tokens 64
    lmloop generate --model runs/tiny --prompts prompts.jsonl --out results.jsonl
    lmloop chat --model smollm2-135m-instruct            # /reset, /save PATH, /exit

Both stream through `lmloop.engine`, as the HTTP server does; text goes to stdout, statistics
and progress to stderr. A prompts file holds one JSON object per line: `{"prompt": "..."}` or
`{"messages": [...]}`, with optional `id` and per-line sampling overrides (`max_tokens`,
`temperature`, `top_p`, `top_k`, `seed`, `stop`); results keep the input order."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from lmloop.artifacts import atomic_write
from lmloop.engine.config import LINE_OVERRIDES, ChatConfig, GenerateConfig
from lmloop.engine.core import Engine, load_engine
from lmloop.engine.params import Completion, SamplingParams
from lmloop.errors import UserError
from lmloop.log import progress
from lmloop.models.io import LoadedModel


def _params(cfg: GenerateConfig | ChatConfig, **over: Any) -> SamplingParams:
    return cfg.sampling.params(**{"logprobs": getattr(cfg, "logprobs", None), **over})


def _read_prompts(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {p}", hint="pass a JSONL file")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict) or not (
            isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)
        ):
            raise UserError(
                f"{p}:{n}: expected an object with 'prompt' (a string) or 'messages' (a list)"
            )
        row["_line"] = n
        rows.append(row)
    if not rows:
        raise UserError(f"{p} holds no prompts")
    return rows


def _encode(engine: Engine, cfg: GenerateConfig, row: dict[str, Any]) -> list[int]:
    if "messages" in row:
        return engine.encode_chat(row["messages"])
    if cfg.chat:
        msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": row["prompt"]}
        ]
        return engine.encode_chat(msgs)
    return engine.encode_prompt(row["prompt"])


def run(cfg: GenerateConfig) -> int:
    if bool(cfg.prompt) == bool(cfg.prompts):
        raise UserError(
            "give exactly one of --prompt TEXT or --prompts FILE.jsonl",
            hint='e.g. lmloop generate --model M --prompt "Once upon a time"',
        )
    base = _params(cfg)  # bad sampling flags fail before the model loads
    rows = _read_prompts(cfg.prompts) if cfg.prompts else [{"prompt": cfg.prompt}]
    line_params = []
    for row in rows:
        over = {k: row[k] for k in LINE_OVERRIDES if k in row}
        try:
            line_params.append(_params(cfg, **over) if over else base)
        except (UserError, TypeError) as e:
            raise UserError(f"{cfg.prompts}:{row['_line']}: {e}") from None
    # cache rows cost memory: no more than used
    batch = max(1, min(cfg.engine.max_batch, len(rows)))
    engine, loaded = load_engine(cfg.model, cfg.engine, max_batch=batch, max_waiting=len(rows) + 1)
    try:
        encoded = []
        for row, p in zip(rows, line_params):
            where = f"{cfg.prompts}:{row['_line']}: " if cfg.prompts else ""
            try:
                ids = _encode(engine, cfg, row)
                engine.check(len(ids), p)
            except UserError as e:
                raise UserError(where + e.message, hint=e.hint) from None
            except Exception as e:  # noqa: BLE001 - a malformed conversation (template error)
                raise UserError(f"{where}cannot render this prompt: {e}") from None
            encoded.append(ids)
        # what `--precision` resolved to, and why; once the input is known good (a bad prompt
        # gets its one line alone)
        print(engine.choice.line(), file=sys.stderr)
        engine.start()
        if cfg.prompts:
            return _run_batch(cfg, engine, loaded, rows, encoded, line_params)
        return _run_one(cfg, engine, loaded, encoded[0], base)
    finally:
        engine.stop()


def _run_one(
    cfg: GenerateConfig, engine: Engine, loaded: LoadedModel, ids: list[int], params: SamplingParams
) -> int:
    t0 = time.perf_counter()
    first, steps = None, []
    for out in engine.generate(ids, params):
        first = first or time.perf_counter()
        if not cfg.json and out.text:
            sys.stdout.write(out.text)
            sys.stdout.flush()
        steps.append(out)
    t1 = time.perf_counter()
    done = Completion.from_steps(steps)  # raises on an engine error
    if cfg.json:
        obj: dict[str, Any] = {
            "model": loaded.name,
            "version": loaded.version,
            "text": done.text,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "token_ids": done.token_ids,
        }
        if done.logprobs is not None:
            obj["logprobs"] = [
                {"token": lp.token, "id": lp.token_id, "logprob": lp.logprob,
                 "top": [{"token": t, "id": i, "logprob": v} for t, i, v in lp.top]}
                for lp in done.logprobs
            ]  # fmt: skip
        print(json.dumps(obj, ensure_ascii=False))
        return 0
    sys.stdout.write("\n")
    first = first or t1
    print(
        f"[{done.prompt_tokens} prompt + {done.completion_tokens} new tokens, "
        f"{done.finish_reason}; first token {(first - t0) * 1000:.0f} ms, "
        f"{max(done.completion_tokens - 1, 0) / max(t1 - first, 1e-9):.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def _run_batch(
    cfg: GenerateConfig,
    engine: Engine,
    loaded: LoadedModel,
    rows: list[dict[str, Any]],
    encoded: list[list[int]],
    params: list[SamplingParams],
) -> int:
    """--prompts: one JSON line per prompt, in input order, to --out or stdout."""
    t0 = time.perf_counter()
    handles = [engine.submit(ids, p) for ids, p in zip(encoded, params)]
    done = [h.result() for h in progress(handles, total=len(rows), desc="generate", unit="prompt")]
    results, new_tokens = [], 0
    for row, c in zip(rows, done):
        new_tokens += c.completion_tokens
        rec = {k: v for k, v in row.items() if k != "_line"}
        rec.update(
            text=c.text,
            finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            model=loaded.name,
            version=loaded.version,
        )
        results.append(json.dumps(rec, ensure_ascii=False))
    body = "".join(r + "\n" for r in results)
    if cfg.out:
        atomic_write(cfg.out, body)
    else:
        sys.stdout.write(body)
    dt = time.perf_counter() - t0
    print(
        f"[{len(rows)} prompts, {new_tokens} new tokens in {dt:.1f} s, "
        f"{new_tokens / max(dt, 1e-9):.1f} tok/s{', wrote ' + cfg.out if cfg.out else ''}]",
        file=sys.stderr,
    )
    return 0


CHAT_HELP = "commands: /reset (forget the conversation), /save PATH (write it as JSON), /exit"


def run_chat(cfg: ChatConfig) -> int:
    base = _params(cfg)
    engine, loaded = load_engine(cfg.model, cfg.engine, max_batch=1, max_waiting=2)
    print(engine.choice.line(), file=sys.stderr)
    tty = sys.stdin.isatty()
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
    if tty:
        print(f"chatting with {loaded.name} ({loaded.version}); {CHAT_HELP}", file=sys.stderr)
    engine.start()
    try:
        while True:
            if tty:
                sys.stderr.write("you> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:  # end of input (Ctrl-D, or the pipe is done)
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            cmd, _, arg = line.strip().partition(" ")
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                messages = list(start)
                print("[conversation reset]", file=sys.stderr)
                continue
            if cmd == "/save":
                if not arg.strip():
                    print("[usage: /save PATH]", file=sys.stderr)
                    continue
                body = {"model": loaded.name, "version": loaded.version, "messages": messages}
                atomic_write(Path(arg.strip()), json.dumps(body, indent=2, ensure_ascii=False))
                print(f"[saved {len(messages)} messages to {arg.strip()}]", file=sys.stderr)
                continue
            if cmd == "/help":
                print(CHAT_HELP, file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            ids = _fit(engine, messages, start)
            if ids is None:
                messages.pop()
                print(
                    f"[this message alone does not fit the context of {engine.context_length} "
                    "tokens; /reset or send a shorter one]",
                    file=sys.stderr,
                )
                continue
            # an encoder-decoder model's answer has the decoder's whole context to itself
            room = engine.context_length - (0 if engine.encoder_decoder else len(ids))
            params = _params(cfg, max_tokens=min(base.max_tokens, room))
            reply = []
            for out in engine.generate(ids, params):
                if out.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {out.error}")
                if out.text:
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
                    reply.append(out.text)
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": "".join(reply)})
    finally:
        engine.stop()
    return 0


def _fit(
    engine: Engine, messages: list[dict[str, str]], start: list[dict[str, str]]
) -> list[int] | None:
    """The conversation's ids, dropping the oldest turns (never the system message) to leave
    room for an answer; None when even the last message alone does not fit."""
    need = 0 if engine.encoder_decoder else min(64, engine.context_length // 4)  # the answer's
    while True:
        ids = engine.encode_chat(messages)
        if len(ids) + need <= engine.context_length:
            return ids
        if len(messages) <= len(start) + 1:
            return None
        del messages[len(start)]  # the oldest turn after the system message
        print("[dropped the oldest turn to fit the context]", file=sys.stderr)
