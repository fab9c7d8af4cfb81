"""What `lmloop serve --upstream URL` is told: `UpstreamSpec`, nested inline in `ServeConfig`.

Torch-free and FastAPI-free: `lmloop serve --help` and config validation read it.

    lmloop serve --model registry:mine --upstream http://gpu-node:8000 --upstream-model base \
        --upstream-reload lora                       # vLLM: POST /v1/load_lora_adapter
    lmloop serve --model registry:mine --upstream http://127.0.0.1:8080 \
        --upstream-format gguf --upstream-reload "./restart-llama.sh {path}"
    lmloop serve --model registry:mine --upstream http://gpu-a:8000 --upstream http://gpu-b:8000 \
        --upstream-reload lora                       # two replicas (lmloop.server.routing)

`--upstream` is repeatable (a comma list in one value works too): several replicas of one
model, served as one. A reload command for several replicas must say which one it reloads:
`{url}` (the replica's URL as given) or `{replica}` (its position, 0, 1, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from lmloop.config import param
from lmloop.errors import UserError

LORA = "lora"  # --upstream-reload lora: the upstream's adapter-loading endpoint (vLLM)
FORMATS = ("auto", "adapter", "model", "hf", "gguf")


@dataclass(frozen=True)
class UpstreamSpec:
    upstream: list[str] = param(
        [],
        "generate through this OpenAI-compatible server (http[s]://HOST:PORT, e.g. vLLM or "
        "llama-server) instead of a local engine; lmloop keeps the API, chat page, feedback "
        "store and metrics. Repeatable (or a comma list): replicas of one model, each request "
        "to the one with the fewest requests in flight",
    )
    upstream_key: str | None = param(
        None, "API key sent to the upstream (default: $LMLOOP_UPSTREAM_KEY)"
    )
    upstream_model: str | None = param(
        None, "model name the upstream serves (default: the only one its /v1/models lists)"
    )
    upstream_reload: str | None = param(
        None,
        "how a registry promotion reaches the upstream: 'lora' (vLLM's POST "
        "/v1/load_lora_adapter) or a command run with {path}, {version} and {name} filled in "
        "(e.g. './restart-llama.sh {path}'; with several replicas it also needs {url} or "
        "{replica}, and runs once per replica); unset: promotions are reported as not live",
    )
    upstream_format: Literal["auto", "adapter", "model", "hf", "gguf"] = param(
        "auto",
        "what a promoted version is handed to the upstream as: adapter (a LoRA adapter folder "
        "over the version served when lmloop started, the upstream's base), model (the "
        "registry's folder as stored), hf (Hugging Face folder), gguf (one file); auto: adapter "
        "with 'lora', hf with a command",
    )
    upstream_lora_rank: int = param(
        16, "rank of the adapters --upstream-format adapter writes (the upstream's max LoRA rank)"
    )
    upstream_reload_timeout: float = param(
        300.0, "seconds a promotion may take (export, reload, the new version's health prompt)"
    )

    def __post_init__(self) -> None:
        if not self.upstream:
            for name in ("upstream_key", "upstream_model", "upstream_reload"):
                if getattr(self, name) is not None:
                    flag = "--" + name.replace("_", "-")
                    raise UserError(f"{flag} needs --upstream URL")
            return
        urls = self.urls
        if not urls:
            raise UserError("--upstream is empty", hint="e.g. --upstream http://127.0.0.1:8080")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UserError(
                    f"--upstream {url!r} is not an http(s) URL",
                    hint="e.g. --upstream http://127.0.0.1:8080",
                )
        bases = [base_url(u) for u in urls]
        for u, b in zip(urls, bases, strict=True):
            if bases.count(b) > 1:
                raise UserError(f"--upstream {u} is given twice", hint="one URL per replica")
        reload = self.upstream_reload
        if reload is not None and not reload.strip():
            raise UserError("--upstream-reload is empty", hint="'lora' or a command with {path}")
        if (reload not in (None, LORA) and len(urls) > 1
                and "{url}" not in reload and "{replica}" not in reload):  # fmt: skip
            raise UserError(
                f"--upstream-reload runs once per replica ({len(urls)} of them), but the command "
                "does not say which one to reload",
                hint="put {url} (the replica's URL) or {replica} (0, 1, ...) in it",
            )
        if self.upstream_lora_rank < 1:
            raise UserError(f"--upstream-lora-rank must be >= 1, got {self.upstream_lora_rank}")
        if not self.upstream_reload_timeout > 0:
            raise UserError(
                f"--upstream-reload-timeout must be > 0, got {self.upstream_reload_timeout}"
            )

    @property
    def urls(self) -> list[str]:
        """The replicas' URLs as given, comma lists split."""
        return [u.strip() for value in self.upstream for u in value.split(",") if u.strip()]

    @property
    def shown(self) -> str:
        """The replicas for a message: `URL` or `URL, URL`."""
        return ", ".join(self.urls)

    @property
    def export_format(self) -> str:
        if self.upstream_format != "auto":
            return self.upstream_format
        return "adapter" if self.upstream_reload == LORA else "hf"


def base_url(url: str) -> str:
    """An upstream's root without a trailing slash or `/v1` (routes add `/v1/...`)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url
