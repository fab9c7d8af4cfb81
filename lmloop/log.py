"""One logging setup, progress bars, and machine-readable metrics (JSONL).

`setup_logging` is called once by the CLI. Modules use `logging.getLogger(__name__)`.
`MetricsWriter` appends one JSON object per line and flushes, so a killed run keeps every line it
logged. `progress` wraps tqdm (rate and ETA; quiet when stderr isn't a terminal unless asked).
This module never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record, not at setup: a process
    that swaps stderr (a test capturing output, a notebook) never gets a closed stream."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(debug: bool = False) -> None:
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger("lmloop")
    root.setLevel(level)
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.propagate = False


class MetricsWriter:
    """Append-only JSONL metrics: `w.write({"step": 1, "loss": 3.2})`."""

    def __init__(self, path: str | Path, *, truncate: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w" if truncate else "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
    return out


def progress(
    it: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
    show: bool = True, **kw: Any,
) -> Iterator[T]:  # fmt: skip
    """A progress bar with rate and ETA; disabled under LMLOOP_NO_PROGRESS=1 (none: show=False)."""
    if not show:
        return iter(it)
    return iter(progress_bar(iterable=it, total=total, desc=desc, unit=unit, **kw))


def progress_bar(*, total: int | None = None, desc: str = "", unit: str = "it", **kw: Any) -> Any:
    """A progress bar to `update(n)` by hand (e.g. tokens as they stream); see `progress`."""
    from tqdm.auto import tqdm  # lazy: ~90 ms, and the CLI imports this module for every command

    disable = os.environ.get("LMLOOP_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kw)


@contextlib.contextmanager
def heartbeat(what: str, every: float = 5.0) -> Iterator[None]:
    """Log "... WHAT (N s)" every `every` seconds while the block runs: a wait with no progress
    to count (a conversion inside a library) still says it is alive."""
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every):
            logging.getLogger("lmloop").info("... %s (%.0f s)", what, time.monotonic() - start)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def aligned(rows: list[list[Any]], *, right_from: int | None = None) -> list[str]:
    """Rows as aligned text columns (left-aligned; right-aligned from column `right_from`)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    right = len(widths) if right_from is None else right_from
    return ["  ".join(str(v).rjust(w) if i >= right else str(v).ljust(w)
                      for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in rows]  # fmt: skip
