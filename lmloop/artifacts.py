"""Artifacts: the contract between stages.

Every stage writes one output directory holding a `meta.json` (schema name, format version,
lmloop version, UTC creation time, resolved config, content hashes of its inputs). Readers call
`read_meta` which checks schema and version and fails with a hint naming the command that
rebuilds it. Outputs are built in a temporary sibling and renamed into place only when complete
(`atomic_dir`, `atomic_file`, `atomic_write`), so a crash or Ctrl-C never leaves a half-written artifact that
looks whole; the renamed output has the mode the user's umask gives a new file or folder (not
the temporary's 0600 / 0700). This module never imports torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmloop import __version__
from lmloop.config import to_dict
from lmloop.errors import UserError

META = "meta.json"
log = logging.getLogger(__name__)


def lmloop_home() -> Path:
    """`$LMLOOP_HOME` (default `~/.lmloop`): the registry, the feedback database, caches."""
    return Path(os.environ.get("LMLOOP_HOME") or "~/.lmloop").expanduser()


def cache_dir() -> Path:
    """Caches (converted models, synthetic corpora); `$LMLOOP_CACHE` overrides `HOME/cache`."""
    return Path(os.environ.get("LMLOOP_CACHE") or lmloop_home() / "cache").expanduser()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hash of a file, or of a directory's files (relative names + contents, sorted)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux): `os.umask`
    can only read it by setting it, which for a moment gives files other threads create mode
    666."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; rename it into place only on success."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600; the output gets the user's mode
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write a file through a temporary sibling and an atomic rename."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, for the reports that draw a PNG."""
    # imported here, not at the top: it costs ~0.4 s, and choosing its backend at import would
    # change it for any process that merely imports this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_png(fig: Any, path: str | Path, **savefig: Any) -> None:
    """Save a matplotlib figure as PNG (atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final`; rename it to `final` only on success.

    An existing `final` is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700; the output gets the user's mode
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_meta(
    schema: str,
    version: int,
    config: Any = None,
    inputs: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "schema": schema,
        "format_version": version,
        "lmloop_version": __version__,
        "created": utc_now(),
        "config": to_dict(config) if config is not None else None,
        "inputs": dict(inputs or {}),
        **extra,
    }


def write_meta(directory: str | Path, meta: dict[str, Any]) -> None:
    write_json(Path(directory) / META, meta)


def read_meta(
    directory: str | Path,
    schema: str | tuple[str, ...],
    versions: tuple[int, ...] = (1,),
    rebuild: str = "",
) -> dict[str, Any]:
    """Read and check `DIR/meta.json`; raise a UserError with a rebuild hint when it's wrong."""
    d = Path(directory)
    schemas = (schema,) if isinstance(schema, str) else schema
    hint = f"rebuild it with `{rebuild}`" if rebuild else None
    if not d.exists():
        raise UserError(f"not found: {d} (expected a {schemas[0]} artifact)", hint=hint)
    path = d / META
    if not path.is_file():
        raise UserError(f"{d} is not an lmloop {schemas[0]} artifact (no {META})", hint=hint)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable: {e}", hint=hint) from None
    if meta.get("schema") not in schemas:
        raise UserError(
            f"{d} is a '{meta.get('schema')}' artifact, expected '{schemas[0]}'", hint=hint
        )
    if meta.get("format_version") not in versions:
        raise UserError(
            f"{d}: {meta.get('schema')} format {meta.get('format_version')}, "
            f"expected {' or '.join(map(str, versions))}",
            hint=hint,
        )
    return meta


def up_to_date(out: Path, schema: str, version: int, key: str) -> dict[str, Any] | None:
    """The meta.json of an output already built from the same config and inputs (its
    `fingerprint` is `key`), else None; `force=true` callers skip the call."""
    if peek_schema(out) != schema:
        return None
    old = json.loads((out / META).read_text(encoding="utf-8"))
    if old.get("fingerprint") != key or old.get("format_version") != version:
        return None
    log.info("%s is up to date (same config and inputs); force=true rebuilds it", out)
    return old


def peek_schema(directory: str | Path) -> str | None:
    """The schema name of an artifact directory, or None when it isn't one."""
    path = Path(directory) / META
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("schema")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def check_output(out: Path, schema: str) -> None:
    """Refuse to replace something that isn't an artifact of the same kind."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"output {out} exists and is a file", hint="choose another --out")
    if not any(out.iterdir()):
        return
    found = peek_schema(out)
    if found != schema:
        what = f"a '{found}' artifact" if found else "a folder that isn't an lmloop artifact"
        raise UserError(
            f"output {out} already exists and holds {what}, expected '{schema}'",
            hint="choose another --out, or remove it",
        )
