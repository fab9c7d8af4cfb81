"""What the server is told: `ServeConfig` (the `lmloop serve` flags) and `ServerSettings` (what
`create_app` reads). Torch-free: `lmloop serve --help` and config validation import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmloop.config import param
from lmloop.engine.spec import EngineSpec
from lmloop.errors import UserError
from lmloop.server.upstream_config import UpstreamSpec


@dataclass
class ServerSettings:
    """Everything `create_app` needs; `lmloop serve` fills it from its ServeConfig."""

    model: str
    model_name: str | None = None  # the id the API reports; default: `model` as given
    db: str | Path | None = None  # feedback database; None: do not record (tests of the app)
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0  # seconds a generation may run before it is cut off
    default_max_tokens: int = 512  # when a request gives none (capped by the context left)
    engine: EngineSpec = field(default_factory=EngineSpec)  # how the model runs (the engine's spec)
    drain_timeout: float = 30.0  # graceful shutdown / retired engines: finish within this
    registry_poll: float = 5.0  # seconds between checks of a `registry:NAME` model's current
    cors_origins: list[str] = field(default_factory=list)
    # keyless: origins besides the server's own that may call it (`--allowed-origin`)
    allowed_origins: list[str] = field(default_factory=list)
    # generation forwarded to an OpenAI-compatible server instead of a local engine
    upstream: UpstreamSpec = field(default_factory=UpstreamSpec)


@dataclass(frozen=True)
class ServeConfig:
    model: str = param(
        "",
        "model to serve: a model or checkpoint folder, a train run folder, a Hugging Face folder, "
        "a .gguf file, an installed short name (smollm2-135m-instruct) or registry:NAME; with "
        "--upstream: registry:NAME, the versions the upstream serves (optional)",
    )
    model_name: str | None = param(None, "model id the API reports (default: --model as given)")
    host: str = param("127.0.0.1", "address to bind; non-loopback needs --api-key or --insecure")
    port: int = param(8000, "TCP port")
    api_key: str | None = param(
        None, "require this key on every route but /health (default: $LMLOOP_API_KEY)"
    )
    insecure: bool = param(False, "allow a non-loopback bind without an API key")
    db: str | None = param(None, "feedback database (default: $LMLOOP_HOME/feedback.db)")
    engine: EngineSpec = param(EngineSpec(), "how the model runs", inline=True)
    max_body_bytes: int = param(1 << 20, "largest request body accepted (413 beyond)")
    request_timeout: float = param(300.0, "seconds one request may generate before it is cut off")
    default_max_tokens: int = param(512, "tokens generated when a request sets no max_tokens")
    drain_timeout: float = param(30.0, "seconds in-flight requests get to finish on shutdown")
    registry_poll: float = param(5.0, "seconds between checks for a new registry version")
    cors_origin: list[str] = param([], "allow browser calls from this origin (repeatable; off)")
    allowed_origin: list[str] = param(
        [],
        "without --api-key, also answer this Host/Origin (http://name:port, name:port, name, "
        "or * for any; repeatable); others get 403",
    )
    proxy: UpstreamSpec = param(UpstreamSpec(), "an upstream that generates", inline=True)

    check: bool = param(
        False,
        "report the C kernel's build, its instruction set and the torch ops the engine uses "
        "(no model loads), then exit: 0, or 1 if something needed is missing",
    )

    def __post_init__(self) -> None:
        if self.proxy.upstream:
            if self.model and not self.model.startswith("registry:"):
                raise UserError(
                    f"with --upstream, --model names the registry entry the upstream serves "
                    f"(registry:NAME), not {self.model!r}",
                    hint="leave --model out to label answers with the upstream's model name",
                )
            if self.proxy.upstream_reload is not None and not self.model:
                raise UserError(
                    "--upstream-reload follows promotions of a registry model: give --model "
                    "registry:NAME"
                )
        elif not self.model and not self.check:
            raise UserError("--model is required", hint="e.g. --model smollm2-135m-instruct")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a TCP port (0-65535)")
        for name in ("max_body_bytes", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("request_timeout", "drain_timeout", "registry_poll"):
            if not getattr(self, name) > 0:
                raise UserError(
                    f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
                )
        for origin in self.allowed_origin:
            if origin != "*" and parse_origin(origin) is None:
                raise UserError(
                    f"--allowed-origin '{origin}' is not an origin",
                    hint="give http://name:port, https://name, name:port, name or *",
                )


def split_host(value: str, default_port: int | None) -> tuple[str, int | None] | None:
    """`host[:port]` (or `[v6]:port`) -> (host, port); None when it does not parse."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    elif value.count(":") == 1:
        name, port_text = value.split(":")
    else:
        name, port_text = value, ""
    if not name:
        return None
    if not port_text:
        return name.lower(), default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        return None
    return name.lower(), int(port_text)


def parse_origin(value: str) -> tuple[str, int | None] | None:
    """An origin as a browser sends it (`scheme://host[:port]`), or as `--allowed-origin` takes
    it (also `host:port`, `host`: any port) -> (host, port or None); None for `null` and for
    what does not parse."""
    value = value.strip()
    if "://" not in value:
        return split_host(value, None)
    scheme, _, rest = value.partition("://")
    default = {"http": 80, "https": 443}.get(scheme.lower())
    if default is None or not rest or "/" in rest.rstrip("/"):
        return None
    return split_host(rest.rstrip("/"), default)
