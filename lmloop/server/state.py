"""What one running app holds: its settings, the backend (and the local model slot), the feedback store and the metrics.

`create_app` makes one `ServerState` and keeps it as `app.state.lmloop`; the routes and the
generation jobs read it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lmloop.feedback.store import FeedbackStore
from lmloop.server.backend import Backend, SnapshotRow
from lmloop.server.errors import APIError
from lmloop.server.metrics import ServerMetrics
from lmloop.server.settings import ServerSettings
from lmloop.server.slot import ModelSlot


class ServerState:
    def __init__(self, settings: ServerSettings, slot: ModelSlot | None):
        self.settings = settings
        self.slot = slot  # the local engine's model slot; None when an upstream generates
        self.backend: Backend | None = None  # what generates (set by `create_app`)
        self.store: FeedbackStore | None = None
        self.metrics = ServerMetrics(self._snapshot)
        self.on_load_failure: Callable[[str], None] | None = None  # set by `lmloop serve` to exit
        self.tasks: list[asyncio.Task] = []

    def _snapshot(self) -> list[SnapshotRow]:
        return [] if self.backend is None else self.backend.snapshot()

    def require_store(self) -> FeedbackStore:
        """The feedback store, or 503 when the server was started without a database."""
        if self.store is None:
            raise APIError(503, "this server records no feedback (started without a database)")
        return self.store
