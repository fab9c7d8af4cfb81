"""Simulated users with a stated preference: the quickstart's and `bench/loop.py`'s.

A benchmark and demo tool, not part of the loop: the loop and its gate never read it. Each
**family** states a preference on screen, judges an answer with a plain text rule (`complies`),
and answers it the way people do, imperfectly:

- a thumb on every answer, up when it complies; 10% of thumbs are flipped (a slip, a mood);
- in the families that correct, a bad answer gets a rewrite in the preferred shape only some of
  the time (`correct_share`); the rest are rated and left;
- rewrites are assembled from the answer itself and a phrase grammar, so no two users word them
  the same way;
- held-out questions are asked in forms the training questions never use (`HELDOUT_FORMS`).

Families (`FAMILIES`):

- `ask-back` (corrections): two sentences, a short answer (at least four words), then a question
  back to the user. The rule asks for a statement before the question, so answering every
  question with a question ("What's a penguin?") does not comply.
- `three-points` (corrections): a numbered list of exactly three points, one per line.
- `one-paragraph` (thumbs only, no corrections): a single paragraph, no line breaks.
  SmolLM2-135M meets it on about 40% of sampled 80-token answers and 6% of greedy 160-token
  ones: thumbs both ways, and room to learn.
- `formal` (thumbs only): no exclamation marks and no "I", "me" or "my". SmolLM2-135M already
  meets it on most answers (77% sampled, 88% greedy), so its thumbs are mostly up: a store with
  too little signal, which the gate should say so about.

The rules are the benchmark's answer key: they score held-out answers before and after a cycle.
The gate learns its own judge from the feedback and never sees them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import httpx

from lmloop.errors import UserError

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
TRAIN_FORMS = [
    "Can you tell me about {}?", "What should I know about {}?", "Explain {} to me.",
    "Why are {} interesting?", "I want to learn about {}.", "Give me a quick overview of {}.",
]  # fmt: skip
# Never used while feedback is collected: a judge or a recipe that keys on the question's
# wording does not carry over to these.
HELDOUT_FORMS = [
    "What is special about {}?", "Teach me something about {}.", "Describe {} briefly.",
    "How would you introduce {} to a friend?", "Tell me the basics of {}.",
]  # fmt: skip

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def sentences(text: str) -> list[str]:
    """Sentences of an answer: split after ., ! or ? followed by a space or the end."""
    text = " ".join(text.split())
    cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(text)), len(text)]
    return [p for a, b in zip(cuts, cuts[1:]) if (p := text[a:b].strip())]


def _clip(sentence: str, words: int) -> str:
    """A sentence cut to `words` words, ending with a full stop."""
    kept = sentence.rstrip("?!.").split()[:words]
    return " ".join(kept).rstrip(",;:") + "." if kept else ""


# A small phrase grammar for what users write, so that corrections and their reasons vary.
_ASK = [
    ("What would you like to know", "about {t}"), ("Which part of {t}", "interests you most"),
    ("Have you ever seen {t}", "yourself"), ("Shall I tell you more", "about {t}"),
    ("What made you curious", "about {t}"), ("Do you want the history", "of {t}"),
    ("Would a comparison help", "with {t}"), ("Is there one thing", "about {t} you wonder about"),
    ("Are you asking for school", "or for fun"), ("Should I go deeper", "into {t}"),
]  # fmt: skip
_ASK_TAIL = ["", " next", " now", " today", " first"]
_FILLER = [
    "{T} have a long history.", "People study {t} in many ways.", "{T} matter in daily life.",
    "There is more to {t} than most people think.", "{T} change over time.",
    "Scientists still learn new things about {t}.", "{T} can be seen in many places.",
]  # fmt: skip
_REASONS = [
    "I prefer {p}.", "Please answer as {p}.", "Next time: {p}.", "Shorter please: {p}.",
    "My preference is {p}.", "Could you keep to {p}?", "That is not what I asked for ({p}).",
]  # fmt: skip


def _filler(topic: str, rng: random.Random) -> str:
    return rng.choice(_FILLER).format(t=topic, T=topic[:1].upper() + topic[1:])


# ---- the families --------------------------------------------------------------------------------

MIN_ANSWER_WORDS = 4


def complies(text: str) -> bool:
    """ask-back: a statement (>= 4 words, not a question), then one question."""
    s = sentences(text)
    return (
        len(s) == 2
        and not s[0].endswith("?")
        and len(s[0].split()) >= MIN_ANSWER_WORDS
        and s[1].endswith("?")
    )


def rewrite(answer: str, topic: str, rng: random.Random) -> str:
    """ask-back: the answer's first sentence (<= 25 words), then a question back."""
    first = sentences(answer)[0] if answer.strip() else ""
    statement = _clip(first, 25)
    if len(statement.split()) < MIN_ANSWER_WORDS:
        statement = _filler(topic, rng)
    head, tail = rng.choice(_ASK)
    question = f"{head} {tail}".format(t=topic) + rng.choice(_ASK_TAIL) + "?"
    return f"{statement} {question}"


_POINT = re.compile(r"^\s*([1-9])[.)]\s+(\S.*)$")


def is_three_points(text: str) -> bool:
    """three-points: exactly three non-empty lines numbered 1, 2, 3, each of >= 3 words."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return len(lines) == 3 and all(
        (m := _POINT.match(line)) and int(m.group(1)) == want and len(m.group(2).split()) >= 3
        for want, line in enumerate(lines, 1)
    )


def three_points(answer: str, topic: str, rng: random.Random) -> str:
    """three-points: up to three of the answer's sentences (<= 16 words each), topped up with
    general statements, numbered `1.` or `1)` as the user happens to type it."""
    points = [_clip(s, 16) for s in sentences(answer) if len(s.split()) >= 3][:3]
    while len(points) < 3:
        extra = _filler(topic, rng)
        if extra not in points:
            points.append(extra)
    mark = rng.choice([".", ")"])
    return "\n".join(f"{i}{mark} {p}" for i, p in enumerate(points, 1))


_FIRST_PERSON = re.compile(r"\b(I|I'm|I'd|I've|I'll)\b|\b(me|my|mine|myself)\b", re.IGNORECASE)


def is_formal(text: str) -> bool:
    """formal: an answer with no exclamation mark and no first person singular."""
    return bool(text.strip()) and "!" not in text and not _FIRST_PERSON.search(text)


def is_one_paragraph(text: str) -> bool:
    """one-paragraph: a non-empty answer in a single paragraph (no line break: no list, no
    headings, no second paragraph)."""
    body = text.strip()
    return bool(body) and "\n" not in body


@dataclass(frozen=True)
class Family:
    name: str
    preference: str  # stated on screen
    complies: Callable[[str], bool]
    correct: Callable[[str, str, random.Random], str] | None  # None: thumbs only
    correct_share: float = 0.7  # of the bad answers, the share a user rewrites
    flip: float = 0.1  # share of thumbs given the wrong way


FAMILIES = {
    f.name: f
    for f in (
        Family("ask-back", "two sentences: a short answer, then a question back to me",
               complies, rewrite),
        Family("three-points", "a numbered list of exactly three points, one per line",
               is_three_points, three_points),
        Family("one-paragraph", "one paragraph: no line breaks, no lists, no headings (thumbs "
               "only, no corrections)", is_one_paragraph, None),
        Family("formal", "a formal register: no exclamation marks, and no 'I', 'me' or 'my' "
               "(thumbs only, no corrections)", is_formal, None),
    )
}  # fmt: skip
ASK_BACK = FAMILIES["ask-back"]
PREFERENCE = ASK_BACK.preference


def prompts(topics: list[str], seed: int, forms: list[str] = TRAIN_FORMS) -> list[tuple[str, str]]:
    """(topic, question) for each topic, the question's wording drawn from `forms`."""
    rng = random.Random(seed)
    return [(t, rng.choice(forms).format(t)) for t in topics]


@dataclass
class Exchange:
    topic: str
    prompt: str
    answer: str
    response_id: str
    version: str | None
    complied: bool  # by the family's rule (the truth, whatever the thumb says)
    thumb: str
    correction: str | None


def _chat(url: str, model: str, prompt: str, **params: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **params}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    if 400 <= r.status_code < 500:  # the run's settings, e.g. answers longer than the context
        raise UserError(f"the server refused a simulated user's question (HTTP {r.status_code}): "
                        f"{_error_message(r)}")  # fmt: skip
    r.raise_for_status()
    return r.json()


def _error_message(r: httpx.Response) -> str:
    """The OpenAI-style error's message, else the body's start, on one line."""
    try:
        text = str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = r.text[:300]
    return " ".join(text.split())


def judge(family: Family, answer: str, topic: str, rng: random.Random) -> dict[str, Any]:
    """What one simulated user sends about one answer: a thumb (sometimes the wrong way), a
    rating, and for a bad answer sometimes a correction with a reason in their own words."""
    ok = family.complies(answer)
    thumb_up = ok != (rng.random() < family.flip)
    body: dict[str, Any] = {"thumb": "up" if thumb_up else "down", "rating": 5 if thumb_up else 1}
    if not ok and family.correct is not None and rng.random() < family.correct_share:
        body["correction"] = family.correct(answer, topic, rng)
        body["reason"] = rng.choice(_REASONS).format(p=family.preference)
    return body


def converse(url: str, model: str, topics: list[str], *, max_tokens: int, seed: int = 0,
             family: Family = ASK_BACK, temperature: float = 0.7, users: int = 8,
             progress: Callable[[list[Exchange]], None] | None = None) -> list[Exchange]:  # fmt: skip
    """One conversation per topic through the server at `url` (the OpenAI chat API), each
    answer judged by `family` and rated through POST /v1/feedback, as a user of the chat page
    would.

    `users` conversations run at once (the server batches them); each has its own random
    stream, so the answers and feedback do not depend on the order requests finish in.
    `progress` is called with the exchanges so far after each one."""

    def one(i: int, topic: str, prompt: str) -> Exchange:
        rng = random.Random(f"{seed}-{i}")
        r = _chat(url, model, prompt, max_tokens=max_tokens, temperature=temperature,
                  seed=rng.randrange(1 << 30))  # fmt: skip
        answer = r["choices"][0]["message"]["content"] or ""
        body = judge(family, answer, topic, rng)
        httpx.post(url + "/v1/feedback", json={"response_id": r["id"], **body},
                   timeout=60).raise_for_status()  # fmt: skip
        return Exchange(topic, prompt, answer, r["id"], r.get("model_version"),
                        family.complies(answer), body["thumb"], body.get("correction"))  # fmt: skip

    return _concurrently(one, prompts(topics, seed), users, progress)


def answer_all(url: str, model: str, topics: list[str], *, max_tokens: int, seed: int = 1,
               users: int = 8) -> list[tuple[str, str, str | None]]:  # fmt: skip
    """Greedy answers to held-out questions (in the held-out forms): (question, answer, the
    version that wrote it)."""

    def one(i: int, topic: str, prompt: str) -> tuple[str, str, str | None]:
        r = _chat(url, model, prompt, max_tokens=max_tokens, temperature=0)
        return prompt, r["choices"][0]["message"]["content"] or "", r.get("model_version")

    return _concurrently(one, prompts(topics, seed, HELDOUT_FORMS), users, None)


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
