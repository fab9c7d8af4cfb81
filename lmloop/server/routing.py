"""Which upstream replica answers a request (`lmloop serve --upstream A --upstream B`).

The policy, in order:

1. **least outstanding requests**: a request goes to the replica in rotation with the fewest
   requests in flight through this lmloop (generation lengths vary a lot, so counting requests
   beats counting turns);
2. **ties by round robin**: among equals, the one after the replica picked last, so sequential
   traffic alternates A, B, A, B;
3. **out on failure, back after a backoff**: a replica that refuses a connection is taken out
   of rotation at once, and the request goes to the next replica (its bytes never reached the
   first; the backend also resends one whose connection was closed before any answer, without
   taking the replica out). A watcher sends it the health prompt after 1 s, then 2, 4, ... up to
   30 s, and puts it back when it answers. When no replica is in rotation, requests still try the
   ones out of it (soonest retry first) before answering 502: a request is never refused for a
   replica's past failure alone.
4. **stale replicas stay out**: a replica whose weights are not known to be the served version
   (a promotion's rollback failed on it) is not tried at all until a later promotion reloads it.

The pool counts; it sends nothing itself (the backend sends, lmloop.server.promotion reloads).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lmloop.server.upstream_config import base_url

log = logging.getLogger(__name__)

BACKOFF = (1.0, 30.0)  # first and longest wait before a failed replica is health-checked again


@dataclass
class Replica:
    url: str  # as given
    index: int
    outstanding: int = 0  # requests in flight through this lmloop
    served: int = 0  # requests sent to it (answered or not)
    up: bool = True
    failures: int = 0  # consecutive failures (the backoff doubles with each)
    retry_at: float = 0.0  # monotonic time of its next health check while down
    error: str | None = None  # why it is out of rotation
    stale: str | None = None  # why its weights are not known to be the served version

    @property
    def base(self) -> str:
        return base_url(self.url)

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "up": self.up and self.stale is None,
                "outstanding": self.outstanding, "served": self.served,
                "error": self.stale or self.error}  # fmt: skip


class ReplicaPool:
    def __init__(self, urls: list[str], backoff: tuple[float, float] = BACKOFF):
        self.replicas = [Replica(u, i) for i, u in enumerate(urls)]
        self.backoff = backoff
        self.turn = 0  # the round robin's next replica among equals

    def candidates(self) -> list[Replica]:
        """Replicas to try for one request, best first: those in rotation by the policy, then
        those out of it by their next retry (stale ones never)."""
        n = len(self.replicas)
        live = [r for r in self.replicas if r.up and r.stale is None]
        live.sort(key=lambda r: (r.outstanding, (r.index - self.turn) % n))
        down = sorted((r for r in self.replicas if not r.up and r.stale is None),
                      key=lambda r: r.retry_at)  # fmt: skip
        return live + down

    def acquire(self, r: Replica) -> None:
        r.outstanding += 1
        r.served += 1
        self.turn = (r.index + 1) % len(self.replicas)

    def release(self, r: Replica) -> None:
        r.outstanding -= 1

    def fail(self, r: Replica, why: str) -> None:
        """Out of rotation; health-checked again after the backoff."""
        first, longest = self.backoff
        r.failures += 1
        wait = min(longest, first * 2 ** (r.failures - 1))
        r.retry_at = time.monotonic() + wait
        if r.up:
            log.warning("upstream replica %s out of rotation (%s); retried in %.0fs", r.url,
                        why, wait)  # fmt: skip
        r.up, r.error = False, why

    def recover(self, r: Replica) -> None:
        if not r.up:
            log.info("upstream replica %s back in rotation", r.url)
        r.up, r.error, r.failures = True, None, 0

    async def watch(self, check: Callable[[Replica], Awaitable[None]], tick: float = 0.25) -> None:
        """Forever: health-check each replica out of rotation when its backoff is over; `check`
        raises when it does not answer."""
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for r in self.replicas:
                if r.up or r.stale is not None or r.retry_at > now:
                    continue
                try:
                    await check(r)
                except Exception as e:  # noqa: BLE001 - any failure keeps it out, backoff doubled
                    self.fail(r, f"health check: {type(e).__name__}: {e}"[:300])
                else:
                    self.recover(r)
