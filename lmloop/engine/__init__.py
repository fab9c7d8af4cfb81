"""lmloop's inference engine: KV-cache decoding, sampling, continuous batching, streaming.

    from lmloop.engine import Engine, SamplingParams, load_engine
    engine, loaded = load_engine("smollm2-135m-instruct")
    with engine:
        print(engine.generate_text("Once upon a time", SamplingParams(max_tokens=32)))

Everything that generates text in lmloop (the `generate` and `chat` commands, batch jobs, the
HTTP server) consumes `Engine.submit` / `Engine.generate`, one streaming path.
"""

from lmloop.engine.core import Engine, RequestHandle, load_engine
from lmloop.engine.memory import release_memory
from lmloop.engine.params import (
    Completion,
    QueueFull,
    SamplingParams,
    StepOutput,
    TokenLogprob,
)

__all__ = [
    "Completion",
    "Engine",
    "QueueFull",
    "RequestHandle",
    "SamplingParams",
    "StepOutput",
    "TokenLogprob",
    "load_engine",
    "release_memory",
]
