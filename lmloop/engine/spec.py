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
from typing import Any, ClassVar, Literal

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
PRECISIONS = ("auto", "fp32", "int8", "int4")
Precision = Literal["auto", "fp32", "int8", "int4"]


@dataclass(frozen=True)
class EngineSpec:
    """How a model is run: precision, KV cache, threads, batch and prefix cache, declared once.

    Nested (inline) in the serve, generate and chat configs, whose flags stay flat
    (`--precision int4`, `--threads 2`), and handed to `load_engine` unchanged. `--int8` and
    `--int4` (`int8: true` in YAML) are aliases of `--precision int8` / `int4`.
    """

    __aliases__: ClassVar[dict[str, tuple[str, str]]] = {
        "int8": ("precision", "int8"),
        "int4": ("precision", "int4"),
    }

    precision: Precision = param(
        "auto",
        "weights: auto (what the source holds: a 4-bit GGUF runs int4; a float checkpoint the "
        "fastest precision within the quality bound in docs/serve.md, measured at load), fp32, "
        "int8 (faster CPU decode, small accuracy cost), or int4 (4-bit blocks in a C kernel "
        "built on first use: the fastest CPU decode; Llama family)",
    )
    kv_cache: Literal["auto", "fp32", "int8"] = param(
        "auto",
        "KV cache precision: fp32, int8 (a quarter of the memory, measured quality cost in "
        "BENCHMARKS.md; Llama family), or auto (int8 with int8 or int4 weights, else fp32)",
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

    prefill_chunk: int = param(
        32,
        "prompt tokens computed between two decode steps, so new prompts do not stall the "
        "streams already running: a longer prompt (or one scored for its logprobs) runs in "
        "chunks of this size, and short ones arriving together take turns up to this many "
        "tokens a step; 0 prefills each prompt at once",
    )

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        for name in ("max_batch", "max_waiting"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0, got {self.threads}")
        if self.max_len is not None and self.max_len < 1:
            raise UserError(f"--max-len must be >= 1, got {self.max_len}")
        if self.prefill_chunk < 0:
            raise UserError(f"--prefill-chunk must be >= 0, got {self.prefill_chunk}")
        if not self.prefix_cache_mb >= 0:
            raise UserError(f"--prefix-cache-mb must be >= 0, got {self.prefix_cache_mb}")

    def engine_kwargs(self) -> dict[str, Any]:
        """The `Engine(...)` keyword arguments this spec stands for."""
        return {
            "precision": self.precision,
            "kv_int8": KV_CACHE[self.kv_cache],
            "threads": self.threads or None,
            "max_batch": self.max_batch,
            "max_waiting": self.max_waiting,
            "max_len": self.max_len,
            "prefix_cache_mb": self.prefix_cache_mb,
            "prefill_chunk": self.prefill_chunk,
        }
