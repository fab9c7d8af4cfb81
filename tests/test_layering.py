"""Enforce the layering in docs/architecture.md by walking the package's imports (static, via ast).

Lazy imports inside functions count too: a torch-free module that imports torch in one function
is not torch-free.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lmloop"
# The only modules at the top of the package: the foundation and the core. Anything else belongs
# in a folder of its layer (data/, feedback/, models/, engine/, training/, server/, stages/).
TOP_LEVEL = {
    "__init__", "artifacts", "cli", "config", "errors", "log",  # foundation
}  # fmt: skip
# Never import torch, transformers or the layers that do: `lmloop --help`, config validation, the
# data pipeline and the feedback store stay fast and light. Every command's config lives in one.
TORCH_FREE = (
    "lmloop.errors", "lmloop.config", "lmloop.artifacts", "lmloop.log", "lmloop.cli",
    "lmloop.registry", "lmloop.data.sources", "lmloop.data.preprocess", "lmloop.data.shards",
    "lmloop.data.pii", "lmloop.data.config", "lmloop.feedback", "lmloop.engine.spec",
    "lmloop.engine.params", "lmloop.engine.config", "lmloop.evaluation.config",
    "lmloop.evaluation.report", "lmloop.training.config", "lmloop.export.config",
    "lmloop.server.settings", "lmloop.loop.config",
)  # fmt: skip
HEAVY = ("torch", "transformers", "lmloop.models", "lmloop.engine", "lmloop.training",
         "lmloop.data.synthetic")  # fmt: skip
# torch-free modules inside a heavy package
LIGHT = ("lmloop.engine.spec", "lmloop.engine.params", "lmloop.engine.config",
         "lmloop.training.config")  # fmt: skip
CHAINERS = {"loop", "quickstart"}  # the only stages allowed to chain other stages


def _imports(path: Path, types: bool = False) -> list[tuple[str, bool]]:
    """(module, at_top_level) for every import in a file; with `types`, the `if TYPE_CHECKING:`
    ones too (they load nothing, so torch-free modules may use them, but a type is still a
    dependency: the layer order and the cycle check count them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    typing_only = {  # `if TYPE_CHECKING:` imports name types; nothing is imported at run time
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for n in ast.walk(block)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only and not types:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (module := _source(node, path)):
            out.append((module, id(node) in top))
            out += [(f"{module}.{a.name}", id(node) in top) for a in node.names]
    return out


def _source(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module a `from ... import` reads: `from ..x import y` in lmloop/a/b.py is
    lmloop.x (relative imports are resolved, so they cannot slip past the checks)."""
    if not node.level:
        return node.module or ""
    rel = path.relative_to(PKG.parent).with_suffix("").parts
    package = list(rel[: len(rel) - node.level])  # a module's own package is one level up
    return ".".join(package + ([node.module] if node.module else []))


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        yield ".".join(p for p in rel.parts if p != "__init__"), f


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_top_level_holds_only_the_foundation_and_the_core():
    flat = {f.stem for f in PKG.glob("*.py")}
    assert flat == TOP_LEVEL, f"put {sorted(flat - TOP_LEVEL)} in the folder of its layer"


def test_torch_free_layers_never_import_torch_or_the_model_layers():
    checked = set()
    for name, f in _modules():
        if _within(name, TORCH_FREE):
            checked.add(name)
            for mod, _ in _imports(f):
                assert not _within(mod, HEAVY) or _within(mod, LIGHT), (
                    f"torch-free module {name} imports {mod}"
                )
    assert {"lmloop.data.sources", "lmloop.feedback.store", "lmloop.cli"} <= checked


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


def test_only_stages_import_the_server():
    for name, f in _modules():
        if _within(name, ("lmloop.server", "lmloop.stages", "lmloop.cli")):
            continue
        for mod, _ in _imports(f):
            assert not _within(mod, ("lmloop.server",)), f"{name} imports {mod}"


# Layers, bottom to top. A module may import its own layer or any below, never one above (lazy
# imports included); the exceptions are named in UPWARD with the reason. docs/architecture.md
# draws the same picture.
LAYERS: dict[str, int] = {
    "lmloop": 0, "lmloop.config": 0, "lmloop.errors": 0, "lmloop.log": 0, "lmloop.artifacts": 0,
    "lmloop.tokenizer": 1, "lmloop.registry": 1, "lmloop.models": 1,
    "lmloop.data": 2, "lmloop.feedback": 2, "lmloop.engine": 2, "lmloop.export": 2,
    "lmloop.training": 3, "lmloop.evaluation": 3, "lmloop.server": 3,
    "lmloop.loop": 4,
    "lmloop.stages": 5,
    "lmloop.cli": 6,
}  # fmt: skip
UPWARD: dict[tuple[str, str], str] = {}


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key, LAYERS[key]
    raise AssertionError(f"{module} sits in no layer: add its package to LAYERS")


def _lmloop_imports():
    for name, f in _modules():
        for mod, _ in _imports(f, types=True):
            if mod == "lmloop" or mod.startswith("lmloop."):
                if mod.rsplit(".", 1)[-1] == "__version__":
                    mod = "lmloop"
                yield name, mod


def test_imports_point_down_the_layers():
    bad = []
    for name, mod in _lmloop_imports():
        (src, lo), (dst, hi) = _layer(name), _layer(mod)
        if hi > lo and (src, dst) not in UPWARD:
            bad.append(f"{name} (layer {lo}) imports {mod} (layer {hi})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_packages_form_no_cycle():
    edges: dict[str, set[str]] = {}
    for name, mod in _lmloop_imports():
        src, dst = _layer(name)[0], _layer(mod)[0]
        if src != dst:
            edges.setdefault(src, set()).add(dst)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(p for p in edges if p in reach(p))
    assert not cycles, f"packages on an import cycle: {cycles}"


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def test_no_private_name_crosses_modules():
    """Neither `from lmloop.x import _y` nor `from lmloop import x` then `x._y`."""
    modules = {name for name, _ in _modules()}
    bad = []
    for name, f in _modules():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        aliases = {}  # local name -> an lmloop module bound to it
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _source(node, f).startswith("lmloop"):
                source = _source(node, f)
                bad += [f"{name} imports {source}.{a.name}" for a in node.names if _private(a.name)]
                aliases |= {a.asname or a.name: f"{source}.{a.name}" for a in node.names
                            if f"{source}.{a.name}" in modules}  # fmt: skip
            elif isinstance(node, ast.Import):  # `import lmloop.x.y as z`
                aliases |= {a.asname: a.name for a in node.names if a.asname and a.name in modules}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                bad.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)
