"""Simulated users with a stated preference: the quickstart's and `bench/loop.py`'s.

The preference (shown on screen by both): **two sentences: a short answer, then a question back
to the user.** A simulated user asks a question through the HTTP API, judges the answer with
`complies`, rates it up when it complies, and otherwise rates it down and sends a compliant
rewrite as the correction: the answer's first sentence (cut to 25 words) followed by a question
back about the topic. Nothing here reads the model: the rule and the rewrite are plain text
functions, so the same judge scores held-out answers before and after a loop cycle.

The rule asks for a statement of at least four words before the question, so a model cannot
satisfy it by answering every question with a question (what an over-optimised preference stage
drifts to: "What's a penguin?").

    lmloop loop ... gate.rule=lmloop.loop.users:complies
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import httpx

PREFERENCE = "two sentences: a short answer, then a question back to me"

# Questions users ask while their feedback is collected ...
TRAIN_TOPICS = [
    "volcanoes", "the moon", "honey bees", "rainbows", "penguins", "the ocean tides", "bread",
    "electric cars", "dinosaurs", "the heart", "coffee", "snowflakes", "lighthouses", "owls",
    "the pyramids", "solar panels", "octopuses", "thunderstorms", "chess", "the violin",
    "deserts", "whales", "maps", "bicycles", "glaciers", "tomatoes", "vaccines", "kites",
    "the printing press", "coral reefs", "sleep", "trains", "mushrooms", "the alphabet",
    "earthquakes", "cheese", "satellites", "ants", "windmills", "the Roman empire", "clouds",
    "recycling", "sharks", "yoga", "the internet", "butterflies", "compasses", "rice",
    "comets", "the piano", "forests", "wolves", "paper", "submarines", "frogs", "telescopes",
    "tea", "the Olympics", "bridges", "cats", "wind", "origami", "parrots", "the brain",
]  # fmt: skip
# ... and held-out questions on other topics, asked before and after the cycle.
HELDOUT_TOPICS = [
    "giraffes", "jazz", "the stock market", "elephants", "tornadoes", "chocolate", "rockets",
    "the Amazon river", "photosynthesis", "castles", "sunflowers", "the Great Wall", "hiking",
    "jellyfish", "batteries", "the camera", "lemons", "skiing", "pirates", "the solar system",
    "bamboo", "soap", "hummingbirds", "the guitar",
]  # fmt: skip
FORMS = [
    "Can you tell me about {}?", "What should I know about {}?", "Explain {} to me.",
    "Why are {} interesting?", "I want to learn about {}.", "Give me a quick overview of {}.",
]  # fmt: skip
ASK_BACK = [
    "What would you like to know next about {}?",
    "Which part of {} interests you most?",
    "Have you ever seen {} yourself?",
    "Shall I tell you more about {}?",
    "What made you curious about {}?",
]

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def sentences(text: str) -> list[str]:
    """Sentences of an answer: split after ., ! or ? followed by a space or the end."""
    out, start = [], 0
    text = " ".join(text.split())
    for m in _SENTENCE_END.finditer(text):
        piece = text[start : m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


MIN_ANSWER_WORDS = 4


def complies(text: str) -> bool:
    """The stated preference: a statement (>= 4 words, not a question), then one question."""
    s = sentences(text)
    return (
        len(s) == 2
        and not s[0].endswith("?")
        and len(s[0].split()) >= MIN_ANSWER_WORDS
        and s[1].endswith("?")
    )


def rewrite(answer: str, topic: str, rng: random.Random) -> str:
    """A compliant rewrite of an answer: its first sentence (<= 25 words), then a question."""
    first = sentences(answer)[0] if answer.strip() else f"{topic.capitalize()} are fascinating."
    words = first.rstrip("?!.").split()
    if len(words) > 25:
        words = words[:25]
    statement = " ".join(words).rstrip(",;:") + "."
    if len(words) < MIN_ANSWER_WORDS:
        statement = f"There is a lot to say about {topic}."
    return f"{statement} {rng.choice(ASK_BACK).format(topic)}"


def prompts(topics: list[str], seed: int) -> list[tuple[str, str]]:
    """(topic, question) for each topic, the question's wording drawn from FORMS."""
    rng = random.Random(seed)
    return [(t, rng.choice(FORMS).format(t)) for t in topics]


@dataclass
class Exchange:
    topic: str
    prompt: str
    answer: str
    response_id: str
    version: str | None
    complied: bool
    correction: str | None


def _chat(url: str, model: str, prompt: str, **params: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **params}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def converse(url: str, model: str, topics: list[str], *, max_tokens: int, seed: int = 0,
             temperature: float = 0.7, users: int = 8,
             progress: Callable[[list[Exchange]], None] | None = None) -> list[Exchange]:  # fmt: skip
    """One conversation per topic through the server at `url` (the OpenAI chat API), each
    answer judged and rated through POST /v1/feedback, as a user of the chat page would.

    `users` conversations run at once (the server batches them); each has its own random
    stream, so the answers and rewrites do not depend on the order requests finish in.
    `progress` is called with the exchanges so far after each one."""

    def one(i: int, topic: str, prompt: str) -> Exchange:
        rng = random.Random(f"{seed}-{i}")
        r = _chat(url, model, prompt, max_tokens=max_tokens, temperature=temperature,
                  seed=rng.randrange(1 << 30))  # fmt: skip
        answer = r["choices"][0]["message"]["content"] or ""
        ok = complies(answer)
        fix = None if ok else rewrite(answer, topic, rng)
        body: dict[str, Any] = {"response_id": r["id"], "thumb": "up" if ok else "down",
                                "rating": 5 if ok else 1}  # fmt: skip
        if fix:
            body |= {"correction": fix, "reason": f"I prefer {PREFERENCE}"}
        httpx.post(url + "/v1/feedback", json=body, timeout=60).raise_for_status()
        return Exchange(topic, prompt, answer, r["id"], r.get("model_version"), ok, fix)

    return _concurrently(one, prompts(topics, seed), users, progress)


def answer_all(url: str, model: str, topics: list[str], *, max_tokens: int, seed: int = 1,
               users: int = 8) -> list[tuple[str, str, str | None]]:  # fmt: skip
    """Greedy answers to held-out questions: (question, answer, the version that wrote it)."""

    def one(i: int, topic: str, prompt: str) -> tuple[str, str, str | None]:
        r = _chat(url, model, prompt, max_tokens=max_tokens, temperature=0)
        return prompt, r["choices"][0]["message"]["content"] or "", r.get("model_version")

    return _concurrently(one, prompts(topics, seed), users, None)


def _concurrently(fn: Callable, items: list[tuple[str, str]], workers: int,
                  progress: Callable | None) -> list:  # fmt: skip
    """fn(i, *item) for every item, `workers` at a time; results in the items' order."""
    results: list[Any] = [None] * len(items)
    done: list[Any] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(fn, i, *item): i for i, item in enumerate(items)}
        for f in as_completed(futures):
            results[futures[f]] = f.result()
            done.append(results[futures[f]])
            if progress is not None:
                progress(done)
    return results
