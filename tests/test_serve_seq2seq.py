"""Serving encoder-decoder (seq2seq) models: the engine's continuous batching of decoder steps
and the HTTP API give the model's own one-at-a-time greedy decode, and feedback on an answer
lands in the store with the version that wrote it.

A tiny random seq2seq model (hidden 32, context 64, weights spread wide enough that greedy
outputs differ between inputs), as `tests/test_generate_seq2seq.py` builds it.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from test_seq2seq import saved_seq2seq
from test_server_kit import Server

from lmloop.engine import Engine, SamplingParams
from lmloop.engine.seq2seq import encoder_input
from lmloop.feedback.store import FeedbackStore
from lmloop.models.seq2seq import generate

# Different input lengths, so rows' cross-attention caches differ in length.
TEXTS = [
    "a dog",
    "the cat sat on the mat",
    "red blue green red blue",
    "Once upon a time there was a little robot who loved to read.",
    "quick brown fox",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return saved_seq2seq(tmp_path_factory.mktemp("s2s") / "model")


def _greedy(tiny: dict, ids: list[int], n: int, stops: set[int]) -> list[int]:
    """The model's own greedy decode of one input, alone in its batch."""
    m = tiny["model"]
    out = generate(m, [ids], max_new_tokens=n, stop_ids=stops,
                   pad_id=int(m.config.pad_token_id), show_progress=False)  # fmt: skip
    return out[0]


def _tokens(handle, seen: list[int] | None = None) -> list[int]:
    out = list(seen or [])
    for step in handle:
        assert step.finish_reason != "error", step.error
        out += step.token_ids
    return out


def test_engine_batches_decoder_steps_like_generate_one_at_a_time(tiny):
    """Five inputs of different lengths through 3 cache rows: two start together, three join
    later (one waits for a free row); rows finish at different steps, so the last row moves
    into a freed one, its cross-attention cache with it. Each output equals the input's
    greedy decode alone."""
    tok = tiny["tok"]
    inputs = [encoder_input(tok, t) for t in TEXTS]
    assert len({len(i) for i in inputs}) == len(inputs)
    maxes = [3, 16, 9, 12, 5]
    wants = [_greedy(tiny, ids, n, set()) for ids, n in zip(inputs, maxes)]
    assert len({tuple(w[:3]) for w in wants}) > 2  # outputs tell the inputs apart
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in maxes]
    engine = Engine(tiny["model"], tok, max_batch=3, max_len=64, threads=1)
    with engine:
        first = [engine.submit(inputs[i], params[i]) for i in (0, 1)]
        it = iter(first[1])
        seen = [t for _ in range(4) for t in next(it).token_ids]  # 4 steps before the others
        later = [engine.submit(inputs[i], params[i]) for i in (2, 3, 4)]
        got = [_tokens(first[0]), _tokens(it, seen)] + [_tokens(h) for h in later]
        steps = engine.steps
    assert got == wants
    assert steps < sum(maxes) - len(maxes)  # decoder steps were shared between rows


def test_engine_stops_at_eos_and_checks_input_and_output_separately(tiny):
    tok, model = tiny["tok"], tiny["model"]
    stops = set(tok.stop_ids) | {model.config.eos_token_id}
    engine = Engine(model, tok, max_batch=2, max_len=64, threads=1)
    assert engine.prefix is None  # an input is not a prefix of the output: no prefix reuse
    with engine:
        for text in TEXTS:
            ids = engine.encode_prompt(text)
            assert ids == tok.encode(text) + [tok.eos_id]
            out = engine.complete(ids, SamplingParams(max_tokens=40, temperature=0))
            want = _greedy(tiny, ids, 40, stops)
            assert out.token_ids == want
            assert out.text == tok.decode(want, skip_special_tokens=True)
        # the chat input is the last user turn
        msgs = [{"role": "user", "content": "a dog"}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": TEXTS[1]}]  # fmt: skip
        assert engine.encode_chat(msgs) == encoder_input(tok, TEXTS[1])
        # input and output each get the 64 positions (not 64 together)
        engine.check(60, SamplingParams(max_tokens=60))
        for n_in, n_out in ((65, 1), (1, 65)):
            with pytest.raises(Exception, match="context of 64"):
                engine.check(n_in, SamplingParams(max_tokens=n_out))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-s2s")
    srv = Server(tiny["dir"], tmp, "--model-name", "s2s", "--max-batch", "4")
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.output()[-3000:]


def test_http_completions_and_chat_equal_greedy_generate(tiny, server):
    tok, model = tiny["tok"], tiny["model"]
    stops = set(tok.stop_ids) | {model.config.eos_token_id}
    # The engine never shows a character cut by max_tokens as U+FFFD (for every model family).
    want = {t: tok.decode(_greedy(tiny, encoder_input(tok, t), 24, stops),
                          skip_special_tokens=True).rstrip("\ufffd") for t in TEXTS}  # fmt: skip
    assert len(set(want.values())) > 2
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    for text in TEXTS[:3]:
        r = client.completions.create(model="s2s", prompt=text, max_tokens=24, temperature=0)
        assert r.choices[0].text == want[text]
        assert r.usage.prompt_tokens == len(encoder_input(tok, text))
        stream = client.completions.create(model="s2s", prompt=text, max_tokens=24,
                                           temperature=0, stream=True)  # fmt: skip
        assert "".join(c.choices[0].text for c in stream if c.choices) == want[text]
    # several prompts in one request: batched in the engine, each its own greedy decode
    r = client.completions.create(model="s2s", prompt=TEXTS, max_tokens=24, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [want[t] for t in TEXTS]
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "a dog"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": TEXTS[3]}]  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(
        model="s2s", messages=msgs, max_tokens=24, temperature=0
    )
    chat = raw.parse()
    assert chat.choices[0].message.content == want[TEXTS[3]]
    stream = client.chat.completions.create(model="s2s", messages=msgs, max_tokens=24,
                                            temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[TEXTS[3]]
    # a rating of the answer lands in the store with the version that wrote it
    version = raw.headers["x-lmloop-model-version"]
    assert version == chat.model_version
    fb = httpx.post(server.url + "/v1/feedback", json={"response_id": chat.id, "rating": 4,
                    "correction": "a better answer"}, timeout=30)  # fmt: skip
    assert fb.status_code == 200, fb.text
    store = FeedbackStore(server.db)
    try:
        rec = store.get_response(chat.id)
        assert rec["model_version"] == version
        assert rec["text"] == want[TEXTS[3]]
        assert rec["messages"][-1] == msgs[-1]
        [f] = store.feedback_for(chat.id)
        assert f["rating"] == 4 and f["correction"] == "a better answer"
    finally:
        store.close()


def test_http_errors_for_seq2seq(server):
    http = httpx.Client(base_url=server.url, timeout=30)
    long = " ".join(["cat"] * 100)
    r = http.post("/v1/completions", json={"prompt": long, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # the input and 64 output tokens fit a 64-token context: they do not share it
    r = http.post("/v1/completions", json={"prompt": TEXTS[3], "max_tokens": 64, "temperature": 0})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"prompt": "a dog", "max_tokens": 65})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/completions",
                  json={"prompt": "a dog", "max_tokens": 2, "echo": True, "logprobs": 1})  # fmt: skip
    assert r.status_code == 400 and "decoder-only" in r.json()["error"]["message"]


def test_chat_cli_answers_each_last_user_turn(tiny, capsys, monkeypatch):
    """`lmloop chat` runs a seq2seq model through the engine: each reply is the greedy decode of
    that message alone (earlier turns are not part of the input)."""
    import io

    from lmloop.cli import main

    tok, model = tiny["tok"], tiny["model"]
    stops = set(tok.stop_ids) | {model.config.eos_token_id}
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{TEXTS[1]}\n{TEXTS[2]}\n"))
    capsys.readouterr()
    rc = main(["chat", "--model", str(tiny["dir"]), "--max-tokens", "20", "--temperature", "0"])
    assert rc == 0
    want = [tok.decode(_greedy(tiny, encoder_input(tok, t), 20, stops), skip_special_tokens=True)
            .rstrip("\ufffd") for t in TEXTS[1:3]]  # fmt: skip
    assert capsys.readouterr().out.splitlines() == want
