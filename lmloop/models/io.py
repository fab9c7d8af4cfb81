"""Loading and saving models: every `--model` / `--init-from` spec loads here.

    from lmloop.models.io import load_model
    lm = load_model("smollm2-135m-instruct")        # installed short name (GGUF, dequantized)
    lm = load_model("runs/tiny")                     # a train RUN_DIR: its best checkpoint

Where a spec points (the forms are in docs/generate.md) is `lmloop.registry.spec.locate`'s
answer; this module loads what it finds: lmloop folders as saved, Hugging Face folders through
`lmloop.models.adapter`, and `.gguf` files dequantized by transformers' GGUF reader, the
converted model cached under `$LMLOOP_HOME/cache/` by the file's sha256 so only the first load
is slow. Only `hf:org/name` may reach the Hugging Face hub."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# `transformers` is imported inside the functions that read Hugging Face or GGUF files: it adds
# ~2.2 s to start-up with torch already loaded, and lmloop's own models never need it.
from lmloop.artifacts import (
    cache_dir,
    make_meta,
    peek_schema,
    read_meta,
    sha256_bytes,
    sha256_file,
    write_json,
    write_meta,
)
from lmloop.errors import UserError
from lmloop.log import heartbeat
from lmloop.models import config_from_dict, config_to_dict, num_params
from lmloop.models.adapter import build_loaded, from_hf, from_hf_model
from lmloop.registry.spec import MODEL_SCHEMAS, locate, read_json
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
# Cached GGUF conversions are keyed by the file's hash under this prefix; change the prefix
# (e.g. "gguf2-") whenever the conversion itself changes, so stale entries are not reused.
GGUF_CACHE_PREFIX = "gguf-"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # eval mode
    tokenizer: Tokenizer
    name: str
    version: str  # 12-hex short hash of the weights, or the registry version
    sha256: str
    kind: str  # "lmloop" | "hf" | "gguf"
    path: str
    quant: str | None = None  # a GGUF's file type ("Q4_1", "Q8_0", "F16"); None: float weights


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
    if spec.startswith("hf:"):
        return _load_hub(spec[3:])
    ref = locate(spec)
    load = {"lmloop": _load_lmloop_dir, "hf": _load_hf_dir, "gguf": _load_gguf}[ref.kind]
    lm = load(ref.path, name=ref.name)
    if ref.version is not None:
        lm.version = ref.version
    return lm


def _load_lmloop_dir(path: Path, *, name: str) -> LoadedModel:

    meta = read_meta(path, MODEL_SCHEMAS)
    values = read_json(path / "config.json")
    family = values.pop("family", None)
    if family is None:
        raise UserError(f"{path / 'config.json'} has no 'family' key")
    cfg = config_from_dict(family, values)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{path} lacks {WEIGHTS}")
    model = build_loaded(cfg, _read_weights(weights, load_file))
    # save_model records the weights' hash; re-hashing hundreds of MB on every load is waste
    sha = (meta.get("model") or {}).get("sha256") or sha256_file(weights)
    return LoadedModel(model, Tokenizer.load(path), name, sha[:12], sha, "lmloop", str(path))


def _read_weights(path: Path, read: Any) -> dict[str, torch.Tensor]:
    """`read(path)`, with a truncated or corrupt file reported as one line naming it."""
    try:
        return read(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors and torch raise their own types
        raise UserError(
            f"cannot read the weights in {path}: {type(e).__name__}: {e}",
            hint="the file is truncated or corrupt: use another checkpoint, or export it again",
        ) from None


def _hf_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of an HF folder (safetensors, sharded or not; else pytorch_model.bin)."""

    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"Hugging Face folder {path} has no *.safetensors or pytorch_model.bin")
    sd: dict[str, torch.Tensor] = {}
    digests = []
    for f in files:
        digests.append(sha256_file(f))
        if f.suffix == ".safetensors":
            sd.update(_read_weights(f, load_file))
        else:
            sd.update(
                _read_weights(f, lambda p: torch.load(p, map_location="cpu", weights_only=True))
            )
    sha = digests[0] if len(digests) == 1 else sha256_bytes("".join(digests).encode())
    return sd, sha


def _load_hf_dir(path: Path, *, name: str) -> LoadedModel:

    hf_config = read_json(path / "config.json")
    sd, sha = _hf_weights(path)
    cfg, ours = from_hf(hf_config, sd)
    model = build_loaded(cfg, ours)
    return LoadedModel(model, Tokenizer.load(path), name, sha[:12], sha, "hf", str(path))


def _load_hub(repo_id: str) -> LoadedModel:
    """An explicit hub id: the one path allowed to download."""
    # lazy: ~2.2 s on top of torch; only HF and GGUF files need it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32)
        tok = Tokenizer.from_hf(AutoTokenizer.from_pretrained(repo_id), f"hf:{repo_id}")
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
            return LoadedModel(
                lm.model, lm.tokenizer, name, sha[:12], sha, "gguf", str(path), gguf_quant(path)
            )
    log.info("converting %s (dequantizing; cached for next time under %s)", path.name, cached)
    with heartbeat(f"converting {path.name}"):
        model = _gguf_to_lmloop(path)
        tokenizer = Tokenizer.load(path)
        _cache_conversion(cached, model, tokenizer, sha, path)
    return LoadedModel(model, tokenizer, name, sha[:12], sha, "gguf", str(path), gguf_quant(path))


def _cache_conversion(
    cached: Path, model: torch.nn.Module, tokenizer: Tokenizer, sha: str, source: Path
) -> None:
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
    # lazy: ~2.2 s on top of torch; only HF and GGUF files need it
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable user file
        raise UserError(f"cannot read GGUF model {path}: {type(e).__name__}: {e}") from None
    return from_hf_model(hf)


# llama.cpp's file types (`general.file_type`), as the gguf package names them less "MOSTLY_".
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}  # fmt: skip
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}  # fmt: skip


def gguf_quant(path: str | Path) -> str | None:
    """The file type a GGUF file declares (`general.file_type`: "Q4_1", "Q8_0", "F16"), read
    from its header alone (the gguf package's reader maps every tensor: ~7 s for SmolLM2's
    file); None when the file does not say or cannot be read."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            version, _, n_kv = struct.unpack("<IQQ", f.read(20))
            if version < 2:
                return None
            for _ in range(n_kv):
                key = _gguf_str(f)
                (vtype,) = struct.unpack("<I", f.read(4))
                if key == "general.file_type" and vtype in (4, 5):
                    (value,) = struct.unpack("<I" if vtype == 4 else "<i", f.read(4))
                    return GGUF_FILE_TYPES.get(value, f"file type {value}")
                _gguf_skip(f, vtype)
    except (OSError, struct.error, ValueError):
        return None
    return None


def _gguf_str(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _gguf_skip(f, vtype: int) -> None:
    if vtype == 8:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, os.SEEK_CUR)
    elif vtype == 9:
        itype, n = struct.unpack("<IQ", f.read(12))
        if itype in _GGUF_SCALARS:
            f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[itype]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _gguf_skip(f, itype)
    elif vtype in _GGUF_SCALARS:
        f.seek(struct.calcsize("<" + _GGUF_SCALARS[vtype]), os.SEEK_CUR)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")
