"""What one running app holds: its settings, the model slot, the feedback store and the metrics.

`create_app` makes one `ServerState` and keeps it as `app.state.lmloop`; the routes and the
generation jobs read it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lmloop.feedback.store import FeedbackStore
from lmloop.server.errors import APIError
from lmloop.server.metrics import RESIDENT, ServerMetrics
from lmloop.server.settings import ServerSettings
from lmloop.server.slot import ModelSlot


class ServerState:
    def __init__(self, settings: ServerSettings, slot: ModelSlot):
        self.settings = settings
        self.slot = slot
        self.store: FeedbackStore | None = None
        self.metrics = ServerMetrics(self._snapshot)
        self.on_load_failure: Callable[[str], None] | None = None  # set by `lmloop serve` to exit
        self.tasks: list[asyncio.Task] = []

    def _snapshot(self) -> list[tuple[str, str, int, int, bool, dict[str, int]]]:
        cur = self.slot.current
        rows = []
        for s in self.slot.all_served():
            try:
                running, waiting = int(s.engine.num_running), int(s.engine.num_waiting)
                counts = dict(s.engine.prefill_counts())
                counts.update({RESIDENT + k: v for k, v in s.engine.resident_bytes().items()})
            except Exception:  # noqa: BLE001 - a stopped engine reports nothing
                running = waiting = 0
                counts = {}
            rows.append((s.model_id, s.version, running, waiting, s is cur, counts))
        return rows

    def require_store(self) -> FeedbackStore:
        """The feedback store, or 503 when the server was started without a database."""
        if self.store is None:
            raise APIError(503, "this server records no feedback (started without a database)")
        return self.store
