"""Sampling and engine settings declared once: the specs every stage that generates nests.

    GenerateConfig.sampling = SamplingSpec()                     # --temperature, --top-p, ...
    ChatConfig.sampling = SamplingSpec(max_tokens=256, temperature=0.7)

Nested with `param(..., inline=True)`, its fields keep their flat flags (`--temperature 0`).
`params()` turns it into the engine's per-request `SamplingParams`. This module never imports
torch, so a stage's `--help` and config validation stay light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lmloop.config import param
from lmloop.engine.params import SamplingParams
from lmloop.errors import UserError


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int = param(128, "most new tokens per prompt")
    temperature: float = param(0.8, "sampling temperature; 0 = greedy")
    top_p: float = param(0.95, "nucleus sampling: keep the most likely tokens up to this mass")
    top_k: int = param(0, "keep only the k most likely tokens (0 = off)")
    min_p: float = param(0.0, "drop tokens less likely than min_p x the top token (0 = off)")
    repetition_penalty: float = param(1.0, "divide the logits of seen tokens (1 = off)")
    presence_penalty: float = param(0.0, "OpenAI presence penalty, -2..2")
    frequency_penalty: float = param(0.0, "OpenAI frequency penalty, -2..2")
    seed: int | None = param(None, "sampling seed: the same seed and prompt give the same text")
    stop: list[str] = param([], "stop string (repeatable); never included in the output")

    def params(self, **over: Any) -> SamplingParams:
        """The engine's validated `SamplingParams`, with `over` (e.g. a prompt's own values)."""
        kw = {**dataclasses.asdict(self), "stop": list(self.stop), **over}
        return SamplingParams(**kw).validate()


KV_CACHE = {"auto": None, "fp32": False, "int8": True}  # --kv-cache -> the engine's kv_int8


@dataclass(frozen=True)
class EngineSpec:
    """How a model is run: precision, KV cache, threads, batch and prefix cache, declared once.

    Nested (inline) in the serve, generate and chat configs, whose flags stay flat
    (`--int4`, `--threads 2`), and handed to `load_engine` unchanged.
    """

    int8: bool = param(False, "int8 weights for faster CPU decode (small accuracy cost)")
    int4: bool = param(
        False,
        "4-bit block weights (llama.cpp Q4_1 size) in a C kernel built on first use: the "
        "fastest CPU decode; Llama family",
    )
    kv_cache: Literal["auto", "fp32", "int8"] = param(
        "auto",
        "KV cache precision: fp32, int8 (a quarter of the memory, measured quality cost in "
        "BENCHMARKS.md; Llama family), or auto (int8 with --int8 or --int4, else fp32)",
    )
    threads: int = param(0, "torch CPU threads (0 = the engine's default)")
    max_batch: int = param(16, "sequences decoded together (continuous batching)")
    max_waiting: int = param(64, "requests queued beyond the batch; more are refused")
    max_len: int | None = param(None, "KV-cache length per sequence (default: model context)")
    prefix_cache_mb: float = param(
        256.0,
        "memory for the keys/values of shared prompt prefixes (system prompt, chat history), "
        "reused instead of prefilled again; 0 turns the prefix cache off",
    )

    def __post_init__(self) -> None:
        if self.int8 and self.int4:
            raise UserError("--int8 and --int4 exclude each other", hint="choose one")
        for name in ("max_batch", "max_waiting"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0, got {self.threads}")
        if self.max_len is not None and self.max_len < 1:
            raise UserError(f"--max-len must be >= 1, got {self.max_len}")
        if not self.prefix_cache_mb >= 0:
            raise UserError(f"--prefix-cache-mb must be >= 0, got {self.prefix_cache_mb}")

    def engine_kwargs(self) -> dict[str, Any]:
        """The `Engine(...)` keyword arguments this spec stands for."""
        return {
            "int8": self.int8,
            "int4": self.int4,
            "kv_int8": KV_CACHE[self.kv_cache],
            "threads": self.threads or None,
            "max_batch": self.max_batch,
            "max_waiting": self.max_waiting,
            "max_len": self.max_len,
            "prefix_cache_mb": self.prefix_cache_mb,
        }
