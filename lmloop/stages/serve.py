"""`lmloop serve`: the OpenAI-compatible API and the chat page, recording every exchange.

    lmloop serve --model smollm2-135m-instruct            # http://127.0.0.1:8000/
    lmloop serve --model registry:assistant --api-key K --host 0.0.0.0

Refuses a non-loopback address without an API key unless `--insecure`; SIGTERM drains the
requests in flight (within `--drain-timeout`) and exits 0 (docs/serve.md). The app itself is
`lmloop.server.create_app`; with `--upstream URL` (repeatable: replicas) OpenAI-compatible
servers generate (`lmloop.server.upstream`, docs/scale.md)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import uvicorn

from lmloop.artifacts import lmloop_home
from lmloop.engine.check import failed, run_checks
from lmloop.engine.memory import limit_arenas
from lmloop.errors import UserError
from lmloop.server import ServerSettings, create_app
from lmloop.server.settings import ServeConfig
from lmloop.server.upstream_checks import check_replicas, insecure_warning
from lmloop.server.upstream_config import UpstreamSpec

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def _check_upstream(proxy: UpstreamSpec) -> UpstreamSpec:
    """Before binding: every replica answers and serves the model asked for (one line, exit 2,
    when not); a warning for plain http to another host. -> the spec with its key and model."""
    for url in proxy.urls:
        warning = insecure_warning(url)
        if warning:
            log.warning(warning)
            print(f"lmloop serve: warning: {warning}", file=sys.stderr, flush=True)
    key = proxy.upstream_key or os.environ.get("LMLOOP_UPSTREAM_KEY") or None
    model = check_replicas(proxy.urls, key, proxy.upstream_model)
    return dataclasses.replace(proxy, upstream_key=key, upstream_model=model)


def check() -> int:
    """`lmloop serve --check`: the engine's build and torch ops, before any model loads."""
    items = run_checks()
    for item in items:
        print(item.line(), flush=True)
    missing = failed(items)
    if missing:
        print(f"missing: {', '.join(i.name for i in missing)}", file=sys.stderr)
        return 1
    return 0


def run(cfg: ServeConfig) -> int:
    if cfg.check:
        return check()
    limit_arenas()  # before the engine's and the server's threads start
    api_key = cfg.api_key or os.environ.get("LMLOOP_API_KEY") or None
    if not is_loopback(cfg.host) and not api_key and not cfg.insecure:
        raise UserError(
            f"refusing to bind {cfg.host} without an API key: anyone who can reach it could use "
            "the model and write to the feedback database",
            hint="set --api-key (or LMLOOP_API_KEY), or pass --insecure if that is intended",
        )
    db = Path(cfg.db).expanduser() if cfg.db else lmloop_home() / "feedback.db"
    proxy = cfg.proxy
    if proxy.upstream:
        proxy = _check_upstream(proxy)
    settings = ServerSettings(
        model=cfg.model,
        model_name=cfg.model_name,
        db=db,
        api_key=api_key,
        max_body_bytes=cfg.max_body_bytes,
        request_timeout=cfg.request_timeout,
        default_max_tokens=cfg.default_max_tokens,
        engine=cfg.engine,
        drain_timeout=cfg.drain_timeout,
        registry_poll=cfg.registry_poll,
        cors_origins=list(cfg.cors_origin),
        allowed_origins=list(cfg.allowed_origin),
        upstream=proxy,
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
    what = f"model {cfg.model}"
    if proxy.upstream:
        what = f"upstream {proxy.shown}, model {proxy.upstream_model}"
        what += f" as {cfg.model}" if cfg.model else ""
    print(
        f"lmloop serve: http://{shown}:{cfg.port}/ ({what}; feedback to {db}"
        f"{'; API key required' if api_key else ''})",
        flush=True,
    )
    server.run()
    if failure:
        raise UserError(
            f"could not {'use the upstream' if proxy.upstream else 'load the model'}: {failure[0]}"
        )
    if not server.started:
        raise UserError(
            f"the server did not start on {cfg.host}:{cfg.port}",
            hint="is the port in use? pick another with --port",
        )
    print("lmloop serve: stopped", file=sys.stderr)
    return 0
