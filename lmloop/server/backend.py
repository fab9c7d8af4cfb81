"""What generates behind the routes: a `Backend`.

The routes (lmloop.server.routes) parse and validate a request the same way whatever answers
it, then hand it to the app's backend:

- `EngineBackend` (lmloop.server.routes): lmloop's own engine, continuous batching on this
  machine, a `ModelSlot` that hot-reloads promoted registry versions;
- `UpstreamBackend` (lmloop.server.upstream): an OpenAI-compatible server elsewhere (vLLM,
  llama.cpp's server, another lmloop), with promotions carried to it by
  lmloop.server.promotion.

Either way every answer names the version that wrote it and is recorded in the feedback store
before the client receives its end, and `/metrics` reads the same series.
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response

from lmloop.server.protocol import ChatRequest, CompletionRequest

# one row per served version for /metrics: (model, version, running, waiting, current, counters)
SnapshotRow = tuple[str, str, int, int, bool, dict[str, int]]


class Backend(Protocol):
    """One app's generation. `start`/`stop` run in the app's lifespan."""

    spec: str  # the model as given (`registry:NAME` follows the registry)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of `GET /health`."""
        ...

    def cards(self) -> list[dict[str, Any]]:
        """`GET /v1/models`'s data; 503 (APIError) while nothing can answer."""
        ...

    def card(self, model_id: str) -> dict[str, Any]:
        """One model card; 404 (APIError) for a name this backend does not serve."""
        ...

    async def generate(
        self, request: Request, body: dict[str, Any], req: ChatRequest | CompletionRequest,
        *, chat: bool,
    ) -> Response:  # fmt: skip
        """Answer one parsed completion request, whole or streamed."""
        ...

    def snapshot(self) -> list[SnapshotRow]: ...

    def serving_version(self) -> str | None:
        """The version new requests are answered with (None while none is)."""
        ...

    def registry_name(self) -> str | None: ...

    def status(self) -> dict[str, Any] | None:
        """Extra state for `/v1/lmloop/versions` (the upstream and its last promotion)."""
        ...
