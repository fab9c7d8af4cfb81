"""`lmloop models list|show|promote|rollback|register`: the model registry from the command line.

    lmloop models register tiny runs/ft --parent v1 --lineage lineage.json
    lmloop models show tiny --plot decisions.png   # every version's gate figures: table + PNG
    lmloop models promote tiny v2      # or tiny@v2
    lmloop models rollback tiny        # back to the version that was current before

The registry itself lives in `lmloop/registry/store.py`."""

from __future__ import annotations

import json
from pathlib import Path

from lmloop.errors import UserError
from lmloop.log import aligned
from lmloop.registry import Registry, split_spec
from lmloop.registry.config import (
    ListConfig,
    PromoteConfig,
    RegisterConfig,
    RollbackConfig,
    ShowConfig,
)
from lmloop.registry.decisions import decision_rows, plot_decisions, table_lines
from lmloop.registry.spec import locate


def _name_version(name: str, version: str | None) -> tuple[str, str | None]:
    base, at = split_spec(name)
    if at is not None and version is not None and at != version:
        raise UserError(f"two versions given: '{name}' and '{version}'")
    return base, at or version


def run_list(cfg: ListConfig) -> list[dict]:
    reg = Registry(cfg.registry)
    if cfg.name is None:
        out = [
            {"name": n, "current": cur[0] if (cur := reg.current(n)) else None,
             "versions": len(reg.versions(n))}
            for n in reg.names()
        ]  # fmt: skip
        if cfg.json:
            print(json.dumps(out, indent=2))
        elif not out:
            print(f"no models registered in {reg.root}")
        else:
            print(*aligned([["name", "current", "versions"]] + [
                [o["name"], o["current"] or "-", o["versions"]] for o in out
            ]), sep="\n")  # fmt: skip
        return out
    versions = reg.versions(cfg.name)
    if cfg.json:
        print(json.dumps(versions, indent=2))
    else:
        print(*aligned([["", "version", "created", "parent", "sha256"]] + [
            ["*" if v["current"] else "", v["version"], v["created"], v["parent"] or "-",
             v["sha256"][:12]]
            for v in versions
        ]), sep="\n")  # fmt: skip
    return versions


def run_show(cfg: ShowConfig) -> dict:
    name, version = _name_version(cfg.name, cfg.version)
    if cfg.plot:
        return _show_decisions(Registry(cfg.registry), name, Path(cfg.plot))
    info = Registry(cfg.registry).show(name, version)
    print(json.dumps(info, indent=2))
    return info


def _show_decisions(reg: Registry, name: str, out: Path) -> dict:
    """Every version's gate figures: a table on the terminal and a PNG at `out`."""
    rows = decision_rows(reg, name)  # an unknown name: a UserError before anything is written
    if not rows:
        raise UserError(f"model '{name}' has no versions to plot")
    for line in table_lines(rows):
        print(line)
    plot_decisions(rows, out, f"{name}: the gate's decisions")
    print(f"wrote {out}")
    return {"name": name, "plot": str(out), "versions": rows}


def run_promote(cfg: PromoteConfig) -> str:
    name, version = _name_version(cfg.name, cfg.version)
    if version is None:
        raise UserError(
            f"which version of '{name}' to promote?", hint=f"`lmloop models promote {name} v2`"
        )
    reg = Registry(cfg.registry)
    before = reg.current(name)
    reg.promote(name, version)
    print(f"{name}: current is now {version} (was {before[0] if before else 'none'})")
    return version


def run_rollback(cfg: RollbackConfig) -> str:
    reg = Registry(cfg.registry)
    before = reg.current(cfg.name)
    version = reg.rollback(cfg.name)
    print(f"{cfg.name}: rolled back to {version} (from {before[0] if before else 'none'})")
    return version


def run_register(cfg: RegisterConfig) -> str:
    lineage: dict = {}
    if cfg.lineage:
        p = Path(cfg.lineage)
        try:
            lineage = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read lineage JSON {p}: {e}") from None
        if not isinstance(lineage, dict):
            raise UserError(f"lineage file {p} must hold a JSON object")
    reg = Registry(cfg.registry)
    source = locate(cfg.model, reg).path  # any `--model` spec; a run gives its best checkpoint
    version = reg.register(cfg.name, source, parent=cfg.parent, lineage=lineage)
    if cfg.promote:
        reg.promote(cfg.name, version)
    print(f"{cfg.name}: registered {version}" + (" (current)" if cfg.promote else ""))
    return version
