"""The engine's prefix cache: shared prompt prefixes reuse their keys and values, and greedy
outputs stay token-identical to an engine without it (lmloop.engine.prefix)."""

from __future__ import annotations

import random

import pytest
import torch
from modelkit import tiny_tokenizer

from lmloop.engine import Engine, SamplingParams
from lmloop.engine.fast import FastLlamaRunner
from lmloop.engine.runner import ModelRunner
from lmloop.models import build_model
from lmloop.models.gpt import GPTConfig
from lmloop.models.llama import LlamaConfig

GEN = 8
GREEDY = SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True, logprobs=0)
CTX = 256

# (family, fast path, int8): both runners, both families, int8 on both
SETUPS = [
    ("llama", True, False),
    ("llama", True, True),
    ("llama", False, False),
    ("gpt", False, False),
    ("gpt", False, True),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    gpt = GPTConfig(
        vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=CTX,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return {"llama": build_model(llama).eval(), "gpt": build_model(gpt).eval()}


def _engine(models, tok, setup, *, cache: bool, **kw) -> Engine:
    family, fast, int8 = setup
    engine = Engine(
        models[family], tok, max_batch=4, fast=fast, precision="int8" if int8 else "fp32",
        prefix_cache_mb=64 if cache else 0, **kw,
    )  # fmt: skip
    want = FastLlamaRunner if fast and family == "llama" else ModelRunner
    assert type(engine.runner) is want
    assert (engine.prefix is not None) == cache
    return engine


def _ids(rng: random.Random, n: int, first: int | None = None) -> list[int]:
    out = [rng.randrange(4, 300) for _ in range(n)]
    if first is not None:
        out[0] = first
    return out


def _scramble(engine: Engine) -> None:
    """Overwrite every cache slot with noise, so a slot the prefix cache should have written
    and did not cannot pass for right by holding the last request's values."""
    r = engine.runner
    if isinstance(r, FastLlamaRunner):  # one k|v tensor, and with --int8 an int8 one + scales
        r.allocate()
        ts = [r.kv] if r.kv_scale is None else [r.kv_scale]
        if r.kv_scale is not None:
            r.kv.copy_(torch.randint_like(r.kv, -127, 128))
    else:
        ts = [r.cache.k, r.cache.v]
    for t in ts:
        t.copy_(torch.randn_like(t) * 10)


class Out(list):
    """A greedy output's token ids; equal to another when the ids are and each token's logprob
    agrees (a prefix cache that misplaces a slot may keep the ids, never the values): to 1e-4
    in fp32; to 1e-2 with int8, whose activation scale is taken over all the tokens of a call,
    so a prompt prefilled in two parts quantizes a little differently (measured: 2e-3)."""

    def __init__(self, completion, int8: bool):
        super().__init__(completion.token_ids)
        self.lps = [x.logprob for x in completion.logprobs]
        self.tol = 1e-2 if int8 else 1e-4

    def __eq__(self, other):
        return list(self) == list(other) and self.lps == pytest.approx(other.lps, abs=self.tol)


def _run(engine: Engine, prompts: list[list[int]]) -> list[Out]:
    """One request after another (the worker is idle in between: it is safe to scramble)."""
    out = []
    for p in prompts:
        _scramble(engine)
        out.append(Out(engine.complete(p, GREEDY), engine.precision == "int8"))
    return out


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: "-".join(map(str, s)))
def test_shared_system_prompt_history_and_repeat_reuse_the_cache(models, tok, setup):
    rng = random.Random(1)
    system = _ids(rng, 41)  # two whole blocks and a part of a third
    users = [_ids(rng, 5 + i, first=10 + i) for i in range(3)]  # distinct first tokens
    shared = [system + u for u in users]

    with (
        _engine(models, tok, setup, cache=False) as plain,
        _engine(models, tok, setup, cache=True) as cached,
    ):
        # 1. a shared system prompt: after the first request, only the user part is prefilled
        want = _run(plain, shared)
        assert _run(cached, shared) == want
        assert cached.prefilled == len(shared[0]) + sum(len(u) for u in users[1:])
        assert cached.prefix.hits == 2

        # 2. a growing chat: turn 2 is turn 1, its answer and a new user message; the answer's
        # keys (all but its last token, never fed) come from turn 1's decode steps
        turn1 = shared[0]
        answer = want[0]
        turn2 = turn1 + list(answer) + _ids(rng, 6, first=20)
        before = cached.prefilled
        assert _run(cached, [turn2]) == _run(plain, [turn2])
        assert cached.prefilled - before == len(turn2) - (len(turn1) + GEN - 1)

        # 3. an exact repeat: everything but the last prompt token is reused
        before = cached.prefilled
        assert _run(cached, [turn2]) == _run(plain, [turn2])
        assert cached.prefilled - before == 1
    assert plain.prefilled == sum(len(p) for p in shared) + 2 * len(turn2)


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: "-".join(map(str, s)))
def test_concurrent_requests_share_the_first_ones_prefix(models, tok, setup):
    """Admitted together: the first request's prompt is stored as soon as it is prefilled, so
    the three next to it reuse it. With every prompt prefilled whole (`prefill_chunk=0`) that
    is at once, and all four decode side by side; with chunked prefill (the default, 32) the
    first fills in chunks while the others wait for it, then they compute only their tails."""
    rng = random.Random(2)
    system = _ids(rng, 35)
    prompts = [system + _ids(rng, 4 + i, first=30 + i) for i in range(4)]
    for chunk in (0, 32):
        outs = {}
        for cache in (False, True):
            engine = _engine(models, tok, setup, cache=cache, prefill_chunk=chunk)
            _scramble(engine)
            handles = [engine.submit(p, GREEDY) for p in prompts]  # queued before the worker
            with engine:
                outs[cache] = [Out(h.result(), engine.precision == "int8") for h in handles]
            if chunk == 0:
                assert engine.steps == GEN - 1  # all four decoded side by side
        # With chunks the four join the batch at other steps with the cache than without;
        # int8 decode quantizes a step's rows over their joint range, so its greedy tokens can
        # flip with the batch (docs/generate.md): there only the prefill count is compared.
        if chunk == 0 or engine.precision != "int8":
            assert outs[True] == outs[False]
        assert engine.prefilled == sum(len(p) for p in prompts) - 3 * len(system)


def test_sampled_outputs_and_logprobs_match_too(models, tok):
    """A seeded sampled request and its logprobs do not depend on where its prefix came from."""
    rng = random.Random(3)
    system = _ids(rng, 40)
    p = SamplingParams(max_tokens=GEN, temperature=0.8, seed=7, logprobs=2, ignore_eos=True)
    prompts = [system + _ids(rng, 5, first=40 + i) for i in range(2)]
    got = {}
    for cache in (False, True):
        with _engine(models, tok, ("llama", True, False), cache=cache) as engine:
            got[cache] = [engine.complete(q, p) for q in prompts]
    for a, b in zip(got[False], got[True]):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id
            assert abs(x.logprob - y.logprob) < 1e-4


def test_prompt_logprobs_requests_prefill_in_full(models, tok):
    """Prompt logprobs need every prompt position's logits: no reuse for them; and a
    scoring-only request (lm-eval's) stores nothing, so it cannot push out recurring prefixes."""
    rng = random.Random(4)
    prompt = _ids(rng, 40)
    score = SamplingParams(max_tokens=0, prompt_logprobs=0)
    with _engine(models, tok, ("llama", True, False), cache=True) as engine:
        engine.complete(_ids(rng, 40), score)
        assert len(engine.prefix) == 0
        engine.complete(prompt, GREEDY)
        first = engine.complete(prompt, score).prompt_logprobs
        assert engine.prefilled == 40 + 2 * len(prompt)
    with _engine(models, tok, ("llama", True, False), cache=False) as engine:
        ref = engine.complete(prompt, score).prompt_logprobs
    assert [x.logprob for x in first[1:]] == pytest.approx([x.logprob for x in ref[1:]], abs=1e-5)


def test_the_memory_budget_evicts_least_recently_used(models, tok):
    """A budget of three blocks: the store never holds more, and what it still holds (the
    most recent prompt's blocks) is reused exactly."""
    engine = _engine(models, tok, ("llama", True, False), cache=True)
    block_bytes = 2 * 2 * 2 * 16 * 8 * 4  # k and v: (layers, kv heads, 16 slots, head dim) fp32
    engine.prefix.budget = 3 * block_bytes
    rng = random.Random(5)
    a, b = _ids(rng, 49), _ids(rng, 49)  # three whole blocks each
    with engine:
        _run(engine, [a, b])
        assert engine.prefix.nbytes <= engine.prefix.budget
        assert len(engine.prefix) == 3
        before = engine.prefilled
        _run(engine, [a])  # evicted by b: prefilled in full
        assert engine.prefilled - before == len(a)
        before = engine.prefilled
        _run(engine, [a[:40] + [7]])  # a's blocks are back; 40 tokens reused
        assert engine.prefilled - before == 1


def test_the_server_counts_what_the_prefix_cache_saved(tmp_path):
    """Two chats with one system prompt: /metrics says how many prompt tokens were prefilled
    and how many came from the cache, and the two add up to the prompts' tokens."""
    import time

    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families
    from test_server_kit import make_tiny_model

    from lmloop.engine.spec import EngineSpec
    from lmloop.server import ServerSettings, create_app

    model = make_tiny_model(tmp_path / "model", max_len=512)
    system = {"role": "system", "content": "You answer briefly and politely. " * 6}
    chats = [[system, {"role": "user", "content": q}] for q in ("Hi there.", "What now?")]
    for mb in (64.0, 0.0):
        with TestClient(
            create_app(ServerSettings(model=str(model), engine=EngineSpec(prefix_cache_mb=mb)))
        ) as c:
            deadline = time.time() + 60
            while c.get("/health").status_code != 200:
                assert time.time() < deadline
                time.sleep(0.05)
            prompt_tokens = 0
            for msgs in chats:
                body = {"messages": msgs, "max_tokens": 3, "temperature": 0}
                prompt_tokens += c.post("/v1/chat/completions", json=body).json()["usage"][
                    "prompt_tokens"
                ]
            got = {
                s.name: s.value
                for fam in text_string_to_metric_families(c.get("/metrics").text)
                for s in fam.samples
            }
        reused = got["lmloop_prefix_cache_tokens_reused_total"]
        assert got["lmloop_prompt_tokens_prefilled_total"] + reused == prompt_tokens
        if mb:
            assert got["lmloop_prefix_cache_hits_total"] == 1
            assert reused >= 40  # the system prompt, at least
        else:
            assert got["lmloop_prefix_cache_hits_total"] == 0 and reused == 0
