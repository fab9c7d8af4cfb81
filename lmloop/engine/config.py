"""The `generate` and `chat` configs (torch-free: the CLI reads them for `--help` and
validation without loading the engine)."""

from __future__ import annotations

from dataclasses import dataclass

from lmloop.config import param
from lmloop.engine.spec import EngineSpec, SamplingSpec

LINE_OVERRIDES = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")


@dataclass(frozen=True)
class GenerateConfig:
    model: str = param(
        "smollm2-135m-instruct",
        "model: an lmloop model/checkpoint folder, a train run folder, a Hugging Face folder, "
        "a .gguf file, registry:NAME, or an installed short name",
    )
    prompt: str = param("", "the prompt to continue (or use --prompts)")
    prompts: str = param("", "a JSONL file of prompts ({'prompt': ...} or {'messages': [...]})")
    out: str = param("", "with --prompts: write results here as JSONL (default: stdout)")
    chat: bool = param(False, "render --prompt as a user message with the model's chat template")
    system: str = param("", "with --chat: a system message")
    sampling: SamplingSpec = param(SamplingSpec(), "sampling settings", inline=True)
    logprobs: int | None = param(None, "with --json: log-probabilities, plus this many top ones")
    json: bool = param(False, "print one JSON object (text, token counts) instead of streaming")
    engine: EngineSpec = param(EngineSpec(), "how the model runs", inline=True)


@dataclass(frozen=True)
class ChatConfig:
    model: str = param("smollm2-135m-instruct", "model spec (as for `lmloop generate`)")
    system: str = param("", "a system message starting the conversation")
    sampling: SamplingSpec = param(
        SamplingSpec(max_tokens=256, temperature=0.7), "sampling settings", inline=True
    )
    engine: EngineSpec = param(EngineSpec(), "how the model runs", inline=True)
