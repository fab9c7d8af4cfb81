"""Sampling settings declared once: the spec every stage that generates nests in its config.

    GenerateConfig.sampling = SamplingSpec()                     # --temperature, --top-p, ...
    ChatConfig.sampling = SamplingSpec(max_tokens=256, temperature=0.7)

Nested with `param(..., inline=True)`, its fields keep their flat flags (`--temperature 0`).
`params()` turns it into the engine's per-request `SamplingParams`. This module never imports
torch, so a stage's `--help` and config validation stay light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmloop.config import param
from lmloop.engine.params import SamplingParams


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
