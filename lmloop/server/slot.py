"""The served model: load in the background, hot-swap without dropping requests, drain, stop.

A `ModelSlot` holds the `Served` model version that takes new requests. A request `acquire`s the
current one and keeps it until it finishes, so a reload (admin call, or a registry promotion the
slot follows) only changes where *new* requests go: the new engine starts taking requests, and
the old one is stopped in the background once its last request is released. Loading and
stopping run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

from lmloop.engine.core import Engine, load_engine
from lmloop.engine.memory import release_memory
from lmloop.engine.spec import EngineSpec
from lmloop.models.io import LoadedModel
from lmloop.registry import Registry, split_spec
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REGISTRY_PREFIX = "registry:"


@dataclass
class Served:
    """One loaded model version and its engine."""

    engine: Engine
    loaded: LoadedModel  # without its model: the engine's runner holds the weights
    model_id: str  # the id the API reports and accepts
    version: str
    spec: str
    inflight: int = 0
    retired: bool = False
    loaded_at: float = field(default_factory=time.time)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        return int(self.engine.context_length)

    @property
    def fingerprint(self) -> str:
        return f"lmloop-{self.version}"

    def accepts(self, name: str) -> bool:
        return name in {
            self.model_id,
            self.loaded.name,
            self.version,
            f"{self.model_id}@{self.version}",
        }


def default_loader(spec: str, how: EngineSpec) -> tuple[Engine, LoadedModel]:
    """Load `spec` into a started Engine. A `registry:NAME` model is labelled with the
    registry's own version string (the one `lmloop models list` shows) by `lmloop.models.io`."""
    engine, loaded = load_engine(spec, how)
    log.info("%s", engine.choice.line())  # what `--precision` resolved to, and why
    # The server needs the engine, not the model: the engine's runner keeps what it reads, so
    # dropping the checkpoint frees its weights (SmolLM2-135M with --int8: 1.9 GB resident
    # before, 0.96 GB after, measured when this was written).
    loaded = dataclasses.replace(loaded, model=None)
    release_memory()
    engine.start()
    return engine, loaded


class ModelSlot:
    def __init__(
        self,
        spec: str,
        *,
        model_id: str | None = None,
        engine: EngineSpec | None = None,
        drain_timeout: float = 30.0,
    ):
        self.spec = spec
        self.model_id = model_id
        self.engine = engine or EngineSpec()
        self.drain_timeout = drain_timeout
        self.current: Served | None = None
        self.error: str | None = None  # why the first load failed
        self._retired: list[Served] = []
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one load at a time

    # ---- state ------------------------------------------------------------------------------
    def all_served(self) -> list[Served]:
        with self._lock:
            return self.all_served_unlocked()

    # ---- load and swap ----------------------------------------------------------------------
    def load(self, spec: str | None = None, *, model_id: str | None = None) -> Served:
        """Load `spec` (default: the slot's spec) and make it current. Blocking; thread-safe."""
        spec = spec or self.spec
        with self._reload_lock:
            t0 = time.perf_counter()
            engine, loaded = default_loader(spec, self.engine)
            reg = split_spec(spec)[0] if spec.startswith(REGISTRY_PREFIX) else None
            mid = model_id or reg or self.model_id or spec
            served = Served(
                engine=engine,
                loaded=loaded,
                model_id=mid,
                version=str(loaded.version),
                spec=spec,
            )
            with self._lock:
                old, self.current = self.current, served
                self.spec = spec
                self.model_id = mid
                self.error = None
                if old is not None:
                    old.retired = True
                    self._retired.append(old)
            log.info(
                "serving %s version %s (loaded in %.1fs)",
                served.model_id,
                served.version,
                time.perf_counter() - t0,
            )
            if old is not None:
                self._maybe_stop(old)
            return served

    def acquire(self) -> Served | None:
        with self._lock:
            served = self.current
            if served is not None:
                served.inflight += 1
            return served

    def release(self, served: Served) -> None:
        with self._lock:
            served.inflight -= 1
        self._maybe_stop(served)

    def _maybe_stop(self, served: Served) -> None:
        with self._lock:
            if not served.retired or served.inflight > 0 or served not in self._retired:
                return
            self._retired.remove(served)
        log.info("stopping drained model version %s", served.version)
        threading.Thread(
            target=_stop_engine, args=(served.engine, self.drain_timeout), daemon=True
        ).start()

    # ---- registry following -----------------------------------------------------------------
    def registry_name(self) -> str | None:
        """NAME when the slot serves `registry:NAME` or `registry:NAME@VERSION`, else None."""
        return split_spec(self.spec)[0] if self.spec.startswith(REGISTRY_PREFIX) else None

    def registry_version(self) -> str | None:
        name, version = split_spec(self.spec)
        if not self.spec.startswith(REGISTRY_PREFIX) or version is not None:
            return None
        cur = Registry().current(name)
        return None if cur is None else str(cur[0])

    async def follow_registry(self, interval: float) -> None:
        """Poll the registry; when its current version changes, load it and swap."""
        while True:
            await asyncio.sleep(interval)
            try:
                version = await asyncio.to_thread(self.registry_version)
                cur = self.current
                if version is not None and cur is not None and version != cur.version:
                    log.info("registry moved to version %s; reloading", version)
                    await asyncio.to_thread(self.load, self.spec)
            except Exception as e:  # noqa: BLE001 - a bad version must not stop the server
                log.error("registry reload failed, keeping the current version: %s", e)

    # ---- shutdown ---------------------------------------------------------------------------
    def shutdown(self, timeout: float) -> None:
        """Take no new requests, let running and queued ones finish within `timeout` seconds,
        then stop every engine (what is still running then ends as 'cancelled')."""
        with self._lock:
            everything = self.all_served_unlocked()
            self.current = None
            self._retired = []
        deadline = time.monotonic() + timeout
        for served in everything:
            while _busy(served.engine) and time.monotonic() < deadline:
                time.sleep(0.02)
            _stop_engine(served.engine, max(1.0, deadline - time.monotonic()))

    def all_served_unlocked(self) -> list[Served]:
        cur = [self.current] if self.current is not None else []
        return cur + [s for s in self._retired if s is not self.current]


def _busy(engine: Engine) -> bool:
    try:
        return bool(engine.alive and (engine.num_running or engine.num_waiting))
    except Exception:  # noqa: BLE001 - a broken engine has nothing left to drain
        return False


def _stop_engine(engine: Engine, timeout: float) -> None:
    try:
        engine.stop(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - stopping is best effort
        log.warning("engine stop failed: %s", e)
