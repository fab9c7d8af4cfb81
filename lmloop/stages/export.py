"""`lmloop export`: a model leaves lmloop as a Hugging Face folder or a GGUF file (docs/export.md).

    lmloop export --model runs/tiny --format hf --out exports/tiny-hf
    lmloop export --model smollm2-135m-instruct --format gguf --out smol.gguf

The writers are `lmloop.export.hf` and `lmloop.export.gguf`; outputs are written atomically."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lmloop.errors import UserError
from lmloop.export.config import GGUF_FAMILIES, ExportConfig, ExportResult
from lmloop.export.gguf import export_gguf
from lmloop.export.hf import export_hf
from lmloop.models import num_params
from lmloop.models.io import load_model

__all__ = ["ExportConfig", "ExportResult", "run"]

log = logging.getLogger(__name__)


def run(cfg: ExportConfig) -> ExportResult:
    out = Path(cfg.out).expanduser()
    if cfg.format == "gguf" and out.is_dir():
        raise UserError(f"--out {out} is a folder; --format gguf writes one file (e.g. model.gguf)")
    lm = load_model(cfg.model, dtype=torch.float32)
    family = lm.model.config.family
    if cfg.format == "gguf" and family not in GGUF_FAMILIES:
        raise UserError(
            f"GGUF export supports the {', '.join(GGUF_FAMILIES)} family (Llama layout) only; "
            f"model {cfg.model} is of the '{family}' family",
            hint="export it with --format hf, which GPT-2 runtimes load",
        )
    if cfg.format == "hf":
        export_hf(lm, out, dtype=cfg.dtype, config=cfg)
    else:
        export_gguf(lm, out, dtype=cfg.dtype)
    result = ExportResult(str(out), cfg.format, family, num_params(lm.model))
    print(f"exported {lm.name} ({family}, {result.params:,} params) as {cfg.format} to {out}")
    return result
