"""Checkpoints of a training run and the run's meta.json.

Layout (read by `lmloop.models.io.load_model`, which accepts a RUN_DIR or one checkpoint folder):

    RUN_DIR/meta.json                     schema "lmloop.run": latest, best, checkpoints, status
    RUN_DIR/metrics.jsonl                 one JSON object per logged step
    RUN_DIR/checkpoints/step-0000100/     a model folder (modelio.save_model, schema
                                          "lmloop.checkpoint") + train_state.pt

`train_state.pt` holds what exact resume needs beyond the weights: optimizer states, the step
(the schedule and the data position are functions of it), every RNG state (Python, NumPy, torch
CPU and CUDA), the LoRA adapter weights of a LoRA run, and a fingerprint of what must not change
between the run and its resume. Each checkpoint folder is built in a temporary sibling and renamed
into place, and meta.json is replaced atomically afterwards, so a SIGKILL at any moment leaves the
previous checkpoint intact and named.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmloop.artifacts import atomic_dir, make_meta, peek_schema, read_meta, write_meta
from lmloop.errors import UserError

log = logging.getLogger(__name__)

RUN_SCHEMA = "lmloop.run"
RUN_VERSION = 1
STATE_FILE = "train_state.pt"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


# ---- RNG ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _tuples(x: Any) -> Any:
    """random.setstate needs tuples; torch.load may hand back lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- writing -----------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    write_model: Callable[[Path], None],
    train_state: dict[str, Any],
) -> str:
    """Write `checkpoints/step-XXXXXXX/` atomically; `write_model(dir)` writes the model files.

    A failed write (disk full, read-only folder) removes its temporary folder and raises a
    UserError naming the checkpoint still intact, so the run can be resumed from it.
    """
    name = f"step-{step:07d}"  # as _STEP_DIR reads it
    try:
        with atomic_dir(run_dir / "checkpoints" / name) as tmp:
            write_model(tmp)
            torch.save({"format_version": STATE_VERSION, **train_state}, tmp / STATE_FILE)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError ("... failed writing file ...")
        if isinstance(e, RuntimeError) and "writ" not in str(e).lower():
            raise
        raise _save_failed(run_dir, f"checkpoint {name}", e) from None
    return name


def _save_failed(run_dir: Path, what: str, e: BaseException) -> UserError:
    prev = latest_checkpoint(run_dir)
    intact = f"checkpoint {prev[0].name} is intact" if prev else "no earlier checkpoint exists"
    why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    return UserError(
        f"cannot write {what} in {run_dir}: {why}; {intact}",
        hint="free disk space or fix the folder's permissions, then rerun with --resume",
    )


def write_run_meta(
    run_dir: Path,
    *,
    config: Any,
    inputs: dict[str, str],
    checkpoints: list[dict[str, Any]],
    status: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """meta.json naming `latest` and `best` (by val loss; None before any evaluation)."""
    latest = checkpoints[-1]["name"] if checkpoints else None
    scored = [c for c in checkpoints if c.get("val_loss") is not None]
    best = min(scored, key=lambda c: (c["val_loss"], -c["step"]))["name"] if scored else None
    meta = make_meta(
        RUN_SCHEMA,
        RUN_VERSION,
        config,
        inputs,
        latest=latest,
        best=best,
        checkpoints=checkpoints,
        status=status,
        **(extra or {}),
    )
    try:
        write_meta(run_dir, meta)
    except OSError as e:
        raise _save_failed(run_dir, "meta.json", e) from None


def prune(
    checkpoints: list[dict[str, Any]], keep_last: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped): the last `keep_last` checkpoints and the best by val loss are kept
    (`delete_checkpoints` removes the dropped ones' folders)."""
    scored = [c for c in checkpoints if c.get("val_loss") is not None]
    best = min(scored, key=lambda c: (c["val_loss"], -c["step"]))["name"] if scored else None
    keep_names = {c["name"] for c in checkpoints[-max(1, keep_last) :]} | {best}
    kept = [c for c in checkpoints if c["name"] in keep_names]
    return kept, [c for c in checkpoints if c["name"] not in keep_names]


def delete_checkpoints(run_dir: Path, dropped: list[dict[str, Any]]) -> None:
    for c in dropped:
        shutil.rmtree(run_dir / "checkpoints" / c["name"], ignore_errors=True)


# ---- reading -----------------------------------------------------------------------------


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """The run's meta.json, or None when RUN_DIR holds no run yet."""
    if peek_schema(run_dir) is None:
        return None
    return read_meta(run_dir, RUN_SCHEMA, (RUN_VERSION,), rebuild="lmloop train ... --out NEW_DIR")


def latest_checkpoint(run_dir: Path) -> tuple[Path, list[dict[str, Any]]] | None:
    """The newest complete checkpoint folder of a run, and the run's checkpoint list."""
    meta = read_run(run_dir)
    if meta and meta.get("latest"):
        path = run_dir / "checkpoints" / meta["latest"]
        if (path / STATE_FILE).is_file():
            return path, list(meta.get("checkpoints") or [])
    # meta.json lost or behind: fall back to the highest complete step folder.
    found = sorted(
        (int(m.group(1)), d)
        for d in (run_dir / "checkpoints").glob("step-*")
        if (m := _STEP_DIR.match(d.name)) and (d / STATE_FILE).is_file()
    )
    if not found:
        return None
    return found[-1][1], [{"name": d.name, "step": s, "val_loss": None} for s, d in found]


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file is the user's to fix
        raise UserError(f"cannot read {path}: {e}", hint="resume from another run dir") from None
    if state.get("format_version") != STATE_VERSION:
        raise UserError(
            f"{path}: train state format {state.get('format_version')}, expected {STATE_VERSION}",
            hint="this checkpoint was written by another lmloop version; start a new run",
        )
    return state
