"""The model registry: named versions of a model, their lineage, and which one is current.

    ROOT/NAME/registry.json        {"name", "current", "stack", "history", "next"}
    ROOT/NAME/versions/v1/         version.json (lineage) + model/ (the model folder or file)

ROOT defaults to `$LMLOOP_HOME/registry`. `register` hard-links (or copies) the model in, so
deleting the training run never breaks a version; versions are numbered per name and never
reused. `promote` makes a version current, `rollback` returns to the one before; every change is
appended to `history`. Every file is written atomically and every change to a name holds an
exclusive file lock, so the loop, the CLI and a server can share a registry (docs/feedback.md).
This module never imports torch."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmloop.artifacts import atomic_dir, atomic_write, lmloop_home, sha256_tree, utc_now
from lmloop.errors import UserError, did_you_mean

FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_root() -> Path:
    return lmloop_home() / "registry"


def split_spec(spec: str) -> tuple[str, str | None]:
    """'NAME' -> (NAME, None); 'NAME@v3' -> (NAME, 'v3'); a 'registry:' prefix is dropped."""
    spec = spec.removeprefix("registry:")
    name, sep, version = spec.partition("@")
    return name, (version if sep else None)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link one file (same filesystem), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_model(src: Path, dst: Path) -> None:
    if src.is_file():
        dst.mkdir(parents=True)
        _link_or_copy(src, dst / src.name)
        return
    shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=False)


class Registry:
    """Named model versions with lineage and one current version per name."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    # -- paths and locking --
    def _check_name(self, name: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(
                f"invalid model name '{name}'",
                hint="use letters, digits, '.', '_' or '-' (at most 100 characters)",
            )
        return name

    def _dir(self, name: str) -> Path:
        return self.root / self._check_name(name)

    def _state_path(self, name: str) -> Path:
        return self._dir(name) / "registry.json"

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        d = self._dir(name)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _read_state(self, name: str) -> dict[str, Any] | None:
        p = self._state_path(name)
        if not p.is_file():
            return None
        try:
            state = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"registry file {p} is unreadable: {e}") from None
        if state.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"registry file {p} has format {state.get('format_version')}, "
                f"expected {FORMAT_VERSION}",
                hint="upgrade lmloop",
            )
        return state

    def _write_state(self, name: str, state: dict[str, Any]) -> None:
        atomic_write(self._state_path(name), json.dumps(state, indent=2) + "\n")

    def _require_state(self, name: str) -> dict[str, Any]:
        state = self._read_state(name)
        if state is None:
            names = self.names()
            raise UserError(
                f"no model named '{name}' in registry {self.root}{did_you_mean(name, names)}",
                hint=("registered: " + ", ".join(names)) if names else "register one first",
            )
        return state

    def _require_version(self, name: str, state: dict[str, Any], version: str) -> str:
        if version not in state["versions"]:
            raise UserError(
                f"model '{name}' has no version '{version}'",
                hint="versions: " + (", ".join(state["versions"]) or "none"),
            )
        return version

    def _version_dir(self, name: str, version: str) -> Path:
        return self._dir(name) / "versions" / version

    def _model_path(self, name: str, version: str) -> Path:
        d = self._version_dir(name, version) / "model"
        info = self._info(name, version)
        return d / info["model_file"] if info.get("model_file") else d

    # -- writing --
    def register(
        self,
        name: str,
        model_dir: str | Path,
        *,
        parent: str | None = None,
        lineage: dict | None = None,
    ) -> str:
        """Copy `model_dir` (a folder, or one file such as a .gguf) in as the next version.

        `lineage` is free-form JSON (conventional keys: `data` {artifact: sha256}, `config`,
        `eval` {report name: figures}); `parent` must be an existing version of `name`.
        The new version is not current until `promote`d. Returns the version (`v1`, `v2`, ...).
        """
        src = Path(model_dir)
        if not src.exists():
            raise UserError(f"model to register not found: {src}")
        try:
            lineage_json = json.loads(json.dumps(lineage or {}))
        except (TypeError, ValueError) as e:
            raise UserError(f"lineage must be JSON-serializable: {e}") from None
        with self._locked(name):
            state = self._read_state(name) or {
                "format_version": FORMAT_VERSION,
                "name": name,
                "current": None,
                "stack": [],
                "versions": [],
                "history": [],
                "next": 1,
            }
            if parent is not None:
                self._require_version(name, state, parent)
            version = f"v{state['next']}"
            # an existing version folder was left by a crash between its rename and the state
            # write: atomic_dir replaces it
            with atomic_dir(self._version_dir(name, version)) as tmp:
                _copy_model(src.resolve(), tmp / "model")
                info = {
                    "format_version": FORMAT_VERSION,
                    "name": name,
                    "version": version,
                    "created": utc_now(),
                    "parent": parent,
                    "source": str(src.resolve()),
                    "model_file": src.name if src.is_file() else None,
                    "sha256": sha256_tree(tmp / "model"),
                    "lineage": lineage_json,
                }
                atomic_write(tmp / "version.json", json.dumps(info, indent=2) + "\n")
            state["versions"].append(version)
            state["next"] += 1
            state["history"].append({"at": utc_now(), "action": "register", "version": version})
            self._write_state(name, state)
        return version

    def promote(self, name: str, version: str) -> None:
        """Make `version` the current version of `name` (remembering the one it replaces)."""
        self._require_state(name)  # before locking: a typo must not create a folder
        with self._locked(name):
            state = self._require_state(name)
            self._require_version(name, state, version)
            previous = state["current"]
            if previous == version:
                return
            state["current"] = version
            state["stack"].append(version)
            state["history"].append(
                {"at": utc_now(), "action": "promote", "version": version, "previous": previous}
            )
            self._write_state(name, state)

    def rollback(self, name: str) -> str:
        """Make the previously current version current again; return it."""
        self._require_state(name)  # before locking: a typo must not create a folder
        with self._locked(name):
            state = self._require_state(name)
            if len(state["stack"]) < 2:
                raise UserError(
                    f"model '{name}' has no earlier current version to roll back to "
                    f"(current: {state['current'] or 'none'})",
                    hint="promote a version instead",
                )
            left = state["stack"].pop()
            state["current"] = cur = state["stack"][-1]
            state["history"].append(
                {"at": utc_now(), "action": "rollback", "version": cur, "previous": left}
            )
            self._write_state(name, state)
            return cur

    # -- reading --
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/registry.json"))

    def current(self, name: str) -> tuple[str, Path] | None:
        """(version, model path) of the current version, or None when there is none."""
        state = self._read_state(name)
        if state is None or not state.get("current"):
            return None
        return state["current"], self._model_path(name, state["current"])

    def resolve(self, spec: str) -> tuple[str, str, Path]:
        """'NAME', 'NAME@vN' or 'registry:NAME[@vN]' -> (name, version, model path)."""
        name, version = split_spec(spec)
        state = self._require_state(name)
        if version is None:
            version = state.get("current")
            if not version:
                raise UserError(
                    f"no current version of registered model '{name}'",
                    hint=f"`lmloop models promote {name} VERSION`",
                )
        self._require_version(name, state, version)
        return name, version, self._model_path(name, version)

    def versions(self, name: str) -> list[dict]:
        """One summary per version, oldest first (version, created, parent, sha256, current)."""
        state = self._require_state(name)
        out = []
        for v in state["versions"]:
            info = self._info(name, v)
            out.append(
                {
                    "version": v,
                    "created": info["created"],
                    "parent": info["parent"],
                    "sha256": info["sha256"],
                    "current": v == state["current"],
                    "path": str(self._model_path(name, v)),
                }
            )
        return out

    def _info(self, name: str, version: str) -> dict[str, Any]:
        p = self._version_dir(name, version) / "version.json"
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"registry entry {p} is unreadable: {e}") from None

    def show(self, name: str, version: str | None = None) -> dict:
        """Everything known about one version (default: the current one, else the latest):
        its lineage, the chain of ancestors, whether it's current, and the name's history."""
        state = self._require_state(name)
        if version is None:
            version = state["current"] or (state["versions"][-1] if state["versions"] else None)
            if version is None:
                raise UserError(f"model '{name}' has no versions")
        self._require_version(name, state, version)
        info = self._info(name, version)
        ancestors = []
        parent = info["parent"]
        while parent is not None and parent not in ancestors:
            ancestors.append(parent)
            parent = self._info(name, parent)["parent"]
        return {
            **info,
            "path": str(self._model_path(name, version)),
            "current": version == state["current"],
            "ancestors": ancestors,
            "history": state["history"],
        }
