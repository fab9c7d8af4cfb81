"""`lmloop serve`: the OpenAI-compatible API and the chat page, recording every exchange.

    lmloop serve --model smollm2-135m-instruct            # http://127.0.0.1:8000/
    lmloop serve --model registry:assistant --api-key K --host 0.0.0.0

Binds 127.0.0.1 unless told otherwise and refuses a non-loopback address without an API key
(`--api-key` or `LMLOOP_API_KEY`) unless `--insecure` is given. The model loads after the
server starts (`GET /health` answers 503 until it is ready); a `registry:NAME` model follows the
registry's current version. SIGTERM stops accepting connections, lets the requests in flight
finish (within `--drain-timeout`) and exits 0. Every exchange goes to the feedback database
(`--db`, default `$LMLOOP_HOME/feedback.db`). The app itself is `lmloop.server.create_app`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmloop.artifacts import lmloop_home
from lmloop.config import param
from lmloop.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str = param(
        "",
        "model to serve: a model or checkpoint folder, a train run folder, a Hugging Face folder, "
        "a .gguf file, an installed short name (smollm2-135m-instruct) or registry:NAME",
    )
    model_name: str | None = param(None, "model id the API reports (default: --model as given)")
    host: str = param("127.0.0.1", "address to bind; non-loopback needs --api-key or --insecure")
    port: int = param(8000, "TCP port")
    api_key: str | None = param(
        None, "require this key on every route but /health (default: $LMLOOP_API_KEY)"
    )
    insecure: bool = param(False, "allow a non-loopback bind without an API key")
    db: str | None = param(None, "feedback database (default: $LMLOOP_HOME/feedback.db)")
    max_batch: int = param(16, "sequences decoded together (continuous batching)")
    max_waiting: int = param(64, "requests queued beyond the batch; more get 429")
    max_len: int | None = param(None, "KV-cache length per sequence (default: model context)")
    max_body_bytes: int = param(1 << 20, "largest request body accepted (413 beyond)")
    request_timeout: float = param(300.0, "seconds one request may generate before it is cut off")
    default_max_tokens: int = param(512, "tokens generated when a request sets no max_tokens")
    drain_timeout: float = param(30.0, "seconds in-flight requests get to finish on shutdown")
    registry_poll: float = param(5.0, "seconds between checks for a new registry version")
    cors_origin: list[str] = param([], "allow browser calls from this origin (repeatable; off)")
    int8: bool = param(False, "int8 weights for faster CPU decode (small accuracy cost)")
    int4: bool = param(
        False,
        "4-bit block weights (llama.cpp Q4_1 size) in a C kernel built on first use: the fastest CPU decode; Llama family",
    )
    kv_cache: Literal["auto", "fp32", "int8"] = param(
        "auto",
        "KV cache precision: fp32, int8 (a quarter of the memory, measured quality cost in "
        "BENCHMARKS.md; Llama family), or auto (int8 with --int8 or --int4, else fp32)",
    )
    prefix_cache_mb: float = param(
        256.0,
        "memory for the keys/values of shared prompt prefixes (system prompt, chat history), "
        "reused instead of prefilled again; 0 turns the prefix cache off",
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise UserError("--model is required", hint="e.g. --model smollm2-135m-instruct")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a TCP port (0-65535)")
        for name in ("max_batch", "max_waiting", "max_body_bytes", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not self.prefix_cache_mb >= 0:
            raise UserError(f"--prefix-cache-mb must be >= 0, got {self.prefix_cache_mb}")
        for name in ("request_timeout", "drain_timeout", "registry_poll"):
            if not getattr(self, name) > 0:
                raise UserError(
                    f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
                )


KV_CACHE = {"auto": None, "fp32": False, "int8": True}  # --kv-cache -> the engine's kv_int8


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def run(cfg: ServeConfig) -> int:
    api_key = cfg.api_key or os.environ.get("LMLOOP_API_KEY") or None
    if not is_loopback(cfg.host) and not api_key and not cfg.insecure:
        raise UserError(
            f"refusing to bind {cfg.host} without an API key: anyone who can reach it could use "
            "the model and write to the feedback database",
            hint="set --api-key (or LMLOOP_API_KEY), or pass --insecure if that is intended",
        )
    import uvicorn

    from lmloop.server import ServerSettings, create_app

    db = Path(cfg.db).expanduser() if cfg.db else lmloop_home() / "feedback.db"
    settings = ServerSettings(
        model=cfg.model,
        model_name=cfg.model_name,
        db=db,
        api_key=api_key,
        max_body_bytes=cfg.max_body_bytes,
        request_timeout=cfg.request_timeout,
        default_max_tokens=cfg.default_max_tokens,
        max_batch=cfg.max_batch,
        max_waiting=cfg.max_waiting,
        max_len=cfg.max_len,
        drain_timeout=cfg.drain_timeout,
        registry_poll=cfg.registry_poll,
        cors_origins=list(cfg.cors_origin),
        int8=cfg.int8,
        int4=cfg.int4,
        kv_int8=KV_CACHE[cfg.kv_cache],
        prefix_cache_mb=cfg.prefix_cache_mb,
    )
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            access_log=False,  # uvicorn's access log writes client addresses; ours does not
            timeout_graceful_shutdown=int(max(1, cfg.drain_timeout)),
            log_level="info",
        )
    )
    failure: list[str] = []

    def on_load_failure(msg: str) -> None:
        failure.append(msg)
        server.should_exit = True

    app.state.lmloop.on_load_failure = on_load_failure
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it once it has shut down, into the handler
        # that was installed before it; make that handler a no-op so a drained SIGTERM exits 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    print(
        f"lmloop serve: http://{shown}:{cfg.port}/ (model {cfg.model}; feedback to {db}"
        f"{'; API key required' if api_key else ''})",
        flush=True,
    )
    server.run()
    if failure:
        raise UserError(f"could not load the model: {failure[0]}")
    if not server.started:
        raise UserError(
            f"the server did not start on {cfg.host}:{cfg.port}",
            hint="is the port in use? pick another with --port",
        )
    print("lmloop serve: stopped", file=sys.stderr)
    return 0
