"""The `lmloop export` settings and result (torch-free: the CLI validates them without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmloop.config import param

GGUF_FAMILIES = ("llama",)


@dataclass(frozen=True)
class ExportConfig:
    model: str = param(
        help="model to export: a model/checkpoint folder, a train run folder, a Hugging Face "
        "folder, a .gguf file, an installed short name or registry:NAME"
    )
    out: str = param(help="output: a folder for --format hf, a .gguf file for --format gguf")
    format: Literal["hf", "gguf"] = param("hf", "hf (Hugging Face folder) or gguf (llama.cpp)")
    dtype: Literal["float32", "float16"] = param(
        "float32", "weight precision written (gguf: F32 or F16; norms stay F32)"
    )


@dataclass
class ExportResult:
    path: str
    format: str
    family: str
    params: int
