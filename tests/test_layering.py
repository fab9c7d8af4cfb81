"""Enforce the layering in STYLE.md by walking the package's imports (static, via ast)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lmloop"
FOUNDATION = {
    "errors",
    "config",
    "artifacts",
    "log",
    "cli",
    "store",
    "registry",
    "feedback_api",
    "pii",
}
CHAINERS = {"loop", "quickstart"}  # the only stages allowed to chain other stages


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at_top_level) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, id(node) in top))
            out += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
    return out


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        yield ".".join(p for p in rel.parts if p != "__init__"), f


def test_foundation_never_imports_torch():
    for name, f in _modules():
        if name.split(".")[-1] in FOUNDATION and name.count(".") == 1:
            for mod, _ in _imports(f):
                assert not mod.startswith(("torch", "transformers")), f"{name} imports {mod}"
                heavy = ("lmloop.models", "lmloop.engine", "lmloop.modelio", "lmloop.training")
                assert not mod.startswith(heavy), f"foundation module {name} imports {mod}"


def _stage(module: str) -> str:
    """The stage a module belongs to: `data_ray` (an engine of the data stage) is `data`."""
    return module.partition("_")[0]


def test_stages_never_import_each_other():
    for name, f in _modules():
        if not name.startswith("lmloop.stages.") or name.split(".")[-1] in CHAINERS:
            continue
        for mod, _ in _imports(f):
            if mod.startswith("lmloop.stages.") or mod == "lmloop.stages":
                target = mod.split(".")[2] if mod.count(".") >= 2 else ""
                own = _stage(name.split(".")[-1])
                assert _stage(target) == own or not target, f"{name} imports {mod}"


def test_lower_layers_never_import_stages_or_cli():
    for name, f in _modules():
        if name.startswith("lmloop.stages") or name == "lmloop.cli":
            continue
        for mod, _ in _imports(f):
            assert not mod.startswith(("lmloop.stages", "lmloop.cli")), f"{name} imports {mod}"
