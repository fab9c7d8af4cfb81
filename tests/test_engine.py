"""The engine: exactness against transformers and full forwards, batching, sampling, streaming."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from modelkit import hf_gpt2, hf_llama, save_hf, tiny_tokenizer
from torch import nn

from lmloop.engine import Engine, QueueFull, SamplingParams
from lmloop.engine.fast import DecodeLinear, FastLlamaRunner
from lmloop.engine.runner import ModelRunner
from lmloop.engine.sampling import Sampler
from lmloop.engine.text import TextStream
from lmloop.errors import UserError
from lmloop.models.cache import KVCache
from lmloop.models.io import load_model

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models(tok, tmp_path_factory):
    """(HF model, the same weights loaded into lmloop) for a tiny Llama and a tiny GPT-2."""
    out = {}
    for name, hf in (
        ("llama", hf_llama(tok.vocab_size, tied=False)),
        ("gpt2", hf_gpt2(tok.vocab_size)),
    ):
        d = tmp_path_factory.mktemp(name)
        save_hf(hf, tok, d)
        out[name] = (hf, load_model(str(d)))
    return out


def _prompts(tok):
    return [tok.encode(t) for t in ("Once upon a time", "The quick brown fox jumps", "12 apples")]


# ---- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_ids_equal_transformers_generate(models, tok, family):
    hf, lm = models[family]
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with Engine(lm.model, lm.tokenizer, max_batch=4) as engine:
        for ids in _prompts(tok):
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
            ours = engine.complete(ids, GREEDY).token_ids
            assert ours == ref[0, len(ids) :].tolist()


def _runners(lm, batch=4, length=64):
    """(runner, tolerance on logits): exact paths to 1e-4; the int8 KV cache to within 2% of
    the logits' range (measured on this tiny model: 0.4%; a scale dropped or applied to the
    wrong slot is off by more than 50%)."""
    model = lm.model
    runners = [(ModelRunner(model, batch, length), 1e-4)]
    if type(model).__name__ == "Llama":
        runners.append((FastLlamaRunner(model, batch, length), 1e-4))
        runners.append((FastLlamaRunner(model, batch, length, kv_int8=True), "2%"))
        scratch = FastLlamaRunner(model, batch, length, kv_int8=True)
        scratch.SCRATCH_MIN = 0  # the reused conversion buffer of long contexts, at any size
        runners.append((scratch, "2%"))
    return runners


def _close(got, want, tol):
    if tol == "2%":
        err = float((got - want).abs().max()) / float(want.max() - want.min())
        assert err < 0.02, err
    else:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("lengths", ["ragged", "equal"])  # the runners' two write paths
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decode_equals_full_forward_batched_and_compacted(models, tok, family, lengths):
    """Rows of different lengths decoded together (and moved when one leaves) give the logits
    of a full forward over each sequence alone: padding and other rows never leak. Rows of one
    length write each step's keys and values to one slot of every row."""
    model = models[family][1].model
    prompts = _prompts(tok)
    if lengths == "equal":
        n = min(len(p) for p in prompts)
        prompts = [p[:n] for p in prompts]
    for runner, tol in _runners(models[family][1]):
        seqs = [list(p) for p in prompts]
        with torch.inference_mode():
            for r, s in enumerate(seqs):
                last = runner.prefill(r, s)
                _close(last, model(torch.tensor([s]))[0, -1], tol)
            nxt = [int(runner.prefill(r, s).argmax()) for r, s in enumerate(seqs)]
            for step in range(5):
                logits = runner.decode(nxt, [len(s) for s in seqs])
                seqs = [s + [t] for s, t in zip(seqs, nxt)]
                for i, s in enumerate(seqs):
                    _close(logits[i], model(torch.tensor([s]))[0, -1], tol)
                nxt = logits.argmax(-1).tolist()
                if step == 1:  # row 0 leaves; the last row moves into its place
                    runner.move(2, 0, len(seqs[2]))
                    seqs, nxt = [seqs[2], seqs[1]], [nxt[2], nxt[1]]


def test_fast_path_is_used_for_llama(models):
    with Engine(models["llama"][1].model, models["llama"][1].tokenizer) as e:
        assert isinstance(e.runner, FastLlamaRunner)
        assert isinstance(e.runner.layers[0][0], DecodeLinear)
    with Engine(models["gpt2"][1].model, models["gpt2"][1].tokenizer) as e:
        assert isinstance(e.runner, ModelRunner)


@pytest.mark.parametrize("dims", [(48, 16), (16, 48)])  # widening, narrowing
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_matches_linear_at_every_row_count(dims, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(dims[1], dims[0], bias=bias)
    fast = DecodeLinear(lin)
    for rows in (1, 3, 16):
        x = torch.randn(rows, dims[1])
        with torch.no_grad():
            torch.testing.assert_close(fast(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_continuous_batching_equals_each_alone(models, tok, family):
    lm = models[family][1]
    prompts = _prompts(tok) + [tok.encode("Tiny models"), tok.encode("The lazy dog")]
    lengths = [12, 5, 9, 3, 7]  # sequences leave at different steps, others join
    with Engine(lm.model, lm.tokenizer, max_batch=3) as engine:
        alone = [
            engine.complete(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, n in zip(prompts, lengths)
        ]
        handles = [
            engine.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, n in zip(prompts, lengths)
        ]
        together = [h.result() for h in handles]
        assert engine.num_running == 0 and engine.num_waiting == 0
    for a, b, n in zip(alone, together, lengths):
        assert a.token_ids == b.token_ids and len(a.token_ids) == n
        assert a.text == b.text and b.finish_reason == "length"


def test_logprobs_match_full_forward(models, tok):
    lm = models["llama"][1]
    ids = _prompts(tok)[0]
    p = SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    with Engine(lm.model, lm.tokenizer) as engine:
        done = engine.complete(ids, p)
    seq = list(ids)
    for lp in done.logprobs:
        with torch.no_grad():
            ref = torch.log_softmax(lm.model(torch.tensor([seq]))[0, -1], -1)
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-4)
        assert [t[1] for t in lp.top] == torch.topk(ref, 3).indices.tolist()
        assert lp.top[0][1] == lp.token_id  # greedy picks the most likely
        assert lp.token == lm.tokenizer.decode([lp.token_id])
        seq.append(lp.token_id)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_logprobs_match_full_forward(models, tok, family):
    lm = models[family][1]
    ids = _prompts(tok)[1]
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(torch.tensor([ids]))[0], -1)  # (T, V)
    with Engine(lm.model, lm.tokenizer) as engine:
        scored = engine.complete(ids, SamplingParams(max_tokens=0, prompt_logprobs=2))
        both = engine.complete(ids, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0))
        plain = engine.complete(ids, SamplingParams(max_tokens=3, temperature=0))
        with pytest.raises(UserError, match="max_tokens"):
            engine.submit(ids, SamplingParams(max_tokens=0))
    assert scored.token_ids == [] and scored.finish_reason == "length"
    plps = scored.prompt_logprobs
    assert len(plps) == len(ids) and plps[0] is None
    for t in range(1, len(ids)):
        assert plps[t].token_id == ids[t] and plps[t].token == lm.tokenizer.decode([ids[t]])
        assert plps[t].logprob == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        assert [i for _, i, _ in plps[t].top] == torch.topk(ref[t - 1], 2).indices.tolist()
    assert [lp.logprob for lp in both.prompt_logprobs[1:]] == [lp.logprob for lp in plps[1:]]
    assert both.prompt_logprobs[1].top == [] and both.token_ids == plain.token_ids


def test_seed_gives_the_same_text_whatever_shares_the_batch(models, tok):
    lm = models["llama"][1]
    ids = _prompts(tok)[1]
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    with Engine(lm.model, lm.tokenizer, max_batch=4) as engine:
        a = engine.complete(ids, p).token_ids
        others = [
            engine.submit(q, SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True))
            for q in _prompts(tok)
        ]
        b = engine.complete(ids, p).token_ids
        [h.result() for h in others]
        c = engine.complete(ids, SamplingParams(**{**p.__dict__, "seed": 99})).token_ids
    assert a == b
    assert a != c  # a different seed samples differently (16 tokens from a near-flat model)


def test_a_draw_follows_the_probabilities_and_never_picks_a_zero():
    from lmloop.engine.sampling import draw

    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])  # unnormalized is fine too: x 2 below
    g = torch.Generator().manual_seed(0)
    n = 6000
    counts = torch.bincount(torch.tensor([draw(probs * 2, g) for _ in range(n)]), minlength=6)
    assert counts[[0, 2, 5]].tolist() == [0, 0, 0]
    freq = counts.float() / n
    assert torch.allclose(freq, probs, atol=0.02), freq  # 3 sigma at 6,000 draws: <= 0.019
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw(probs, g1) for _ in range(50)] == [draw(probs, g2) for _ in range(50)]
    for bad in (torch.tensor([0.5, float("nan")]), torch.zeros(3)):
        with pytest.raises(ValueError, match="cannot sample"):
            draw(bad, g)


def test_sampler_filters_and_penalties():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0, 2.9])
    pick = lambda **kw: Sampler(SamplingParams(**kw), [], 5).pick(logits)  # noqa: E731
    assert pick(temperature=0) == 1
    assert all(pick(temperature=5.0, top_k=1, seed=s) == 1 for s in range(20))
    assert all(pick(temperature=5.0, top_p=0.01, seed=s) == 1 for s in range(20))
    assert all(pick(temperature=5.0, min_p=0.99, seed=s) == 1 for s in range(20))
    assert {pick(temperature=1.0, top_k=2, seed=s) for s in range(60)} == {1, 4}
    # repetition penalty over the prompt: token 1 (seen) is divided by 10 -> 4 wins
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=10), [1], 5).pick(logits) == 4
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=2.0), [], 5)
    s.observe(1)
    assert s.pick(logits) == 4  # 3.0 - 2.0 < 2.9
    s = Sampler(SamplingParams(temperature=0, presence_penalty=0.05), [], 5)
    s.observe(1)
    s.observe(1)
    assert s.pick(logits) == 1  # presence counts once: 3.0 - 0.05 > 2.9


# ---- streaming text --------------------------------------------------------------------------
class Scripted(nn.Module):
    """A fake model: the token at position p predicts script[p] (then `end`)."""

    def __init__(self, script: list[int], vocab: int, end: int):
        super().__init__()
        self.script, self.end = script, end
        self.config = SimpleNamespace(vocab_size=vocab)
        self.max_seq_len = 64

    def new_cache(self, batch: int, max_len: int | None = None, **kw) -> KVCache:
        return KVCache(1, batch, max_len or 64, 1, 1)

    def forward(self, ids, positions=None, cache=None, token_mask=None):
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T)[None].expand(B, T)
        if cache is not None:
            cache.begin(positions, token_mask)
        out = torch.full((B, T, self.config.vocab_size), -10.0)
        for b in range(B):
            for t in range(T):
                p = int(positions[b, t])
                out[b, t, self.script[p] if p < len(self.script) else self.end] = 10.0
        return out


def _scripted_engine(tok, text: str, **kw) -> Engine:
    return Engine(Scripted(tok.encode(text), tok.vocab_size, tok.eos_id), tok, **kw)


def test_utf8_split_characters_are_emitted_whole(tok):
    text = "aé🙂b ça"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    with _scripted_engine(tok, text) as engine:
        outs = list(engine.generate([5], SamplingParams(max_tokens=len(ids), temperature=0)))
    pieces = [o.text for o in outs]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens completed no character
    assert sum(len(o.token_ids) for o in outs) == len(ids) == outs[-1].completion_tokens
    # cut in the middle of the emoji: the partial character is dropped, never shown as U+FFFD
    with _scripted_engine(tok, text) as engine:
        cut = engine.complete([5], SamplingParams(max_tokens=4, temperature=0))
    assert cut.text == "aé" and cut.finish_reason == "length"


def test_stop_strings_across_tokens_are_never_emitted(tok):
    text = "hello world. bye now"
    with _scripted_engine(tok, text) as engine:
        outs = list(
            engine.generate([5], SamplingParams(max_tokens=30, temperature=0, stop=["ld. b"]))
        )
        assert "".join(o.text for o in outs) == "hello wor"
        assert outs[-1].finish_reason == "stop"
        # a held-back prefix that turns out not to be a stop is released
        done = engine.complete([5], SamplingParams(max_tokens=30, temperature=0, stop=["worm"]))
        assert done.text == text and done.finish_reason == "stop"  # ended by EOS
        done = engine.complete([5], SamplingParams(max_tokens=30, temperature=0, stop=["now!"]))
        assert done.text == text
    s = TextStream(tok.decode, [], ["abc"])
    got = [s.push(t)[0] for t in tok.encode("xxab")]
    assert "".join(got) == "xx"  # "ab" is held: it may start "abc"
    assert s.flush() == "ab"


def test_stop_token_ids(tok):
    text = "hello world"
    stop_id = tok.encode(" world")[0]
    with _scripted_engine(tok, text) as engine:
        done = engine.complete(
            [5], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id])
        )
    assert done.text == "hello" and done.finish_reason == "stop" and done.token_ids[-1] == stop_id


# ---- lifecycle -------------------------------------------------------------------------------
def test_cancel_and_async_iteration(models, tok):
    lm = models["llama"][1]
    ids = _prompts(tok)[0]
    with Engine(lm.model, lm.tokenizer) as engine:
        h = engine.submit(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        it = iter(h)
        first = next(it)
        assert not first.finished
        h.cancel()
        rest = list(it)
        assert rest[-1].finished and rest[-1].finish_reason == "cancelled"
        assert rest[-1].completion_tokens < 40

        async def consume():
            h2 = engine.submit(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
            return [o async for o in h2]

        outs = asyncio.run(consume())
        assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 6
        gen = engine.generate(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        next(gen)
        gen.close()  # closing the stream cancels the request
        for _ in range(200):
            if engine.num_running == 0:
                break
            threading.Event().wait(0.01)
        assert engine.num_running == 0 and engine.alive


def test_queue_full_and_bad_requests(models, tok):
    lm = models["llama"][1]
    engine = Engine(lm.model, lm.tokenizer, max_waiting=2)  # not started: requests wait
    ids = _prompts(tok)[0]
    engine.submit(ids, GREEDY)
    engine.submit(ids, GREEDY)
    with pytest.raises(QueueFull):
        engine.submit(ids, GREEDY)
    ctx = engine.context_length
    e = pytest.raises(UserError, engine.submit, [1] * (ctx + 5), GREEDY).value
    assert str(ctx + 5) in str(e) and str(ctx) in str(e)
    e = pytest.raises(UserError, engine.submit, [1] * 40, SamplingParams(max_tokens=30)).value
    assert "40" in str(e) and "30" in str(e) and str(ctx) in str(e)
    for bad in (
        dict(max_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
        dict(top_k=-1), dict(stop=[""]), dict(logprobs=99), dict(temperature=float("nan")),
        dict(temperature=float("inf")), dict(temperature="1"), dict(top_p=True),
        dict(repetition_penalty=1e-300), dict(repetition_penalty=0), dict(min_p=float("nan")),
        dict(presence_penalty=float("inf")),
    ):  # fmt: skip
        with pytest.raises(UserError):
            engine.submit(ids, SamplingParams(**bad))
    engine.start()
    assert engine.alive
    engine.stop()
    assert not engine.alive


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_weights_stay_close(models, tok, family):
    lm = models[family][1]
    ids = _prompts(tok)[0]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with Engine(lm.model, lm.tokenizer, precision="int8") as engine:
        with torch.inference_mode():
            q = engine.runner.prefill(0, ids)
        assert engine.complete(ids, GREEDY).completion_tokens == 12
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids]))[0, -1]
    assert float((q - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-3
    assert all(isinstance(p, torch.nn.Parameter) for p in lm.model.parameters())  # untouched
    after = lm.model.state_dict()  # smoothing and folding worked on copies
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers():
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    lm = load_model("smollm2-135m-instruct")
    gguf = Path(lm.path)
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    ids = lm.tokenizer.encode(prompt)
    want = ref.generate(
        torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids) :].tolist()
    with Engine(lm.model, lm.tokenizer, max_len=512) as engine:
        got = engine.complete(ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert got.token_ids == want


def test_a_failing_model_ends_requests_with_error_and_the_worker_survives(tok):
    class Broken(Scripted):
        def forward(self, ids, positions=None, cache=None, token_mask=None):
            if positions is not None and int(positions.max()) >= 3:
                raise RuntimeError("boom")
            return super().forward(ids, positions, cache, token_mask)

    engine = Engine(Broken(tok.encode("hello world"), tok.vocab_size, tok.eos_id), tok)
    with engine:
        outs = list(engine.generate([5], SamplingParams(max_tokens=10, temperature=0)))
        assert outs[-1].finish_reason == "error" and "boom" in outs[-1].error
        with pytest.raises(RuntimeError, match="boom"):
            engine.complete([5], SamplingParams(max_tokens=10, temperature=0))
        assert engine.complete([5], SamplingParams(max_tokens=2, temperature=0)).token_ids
        assert engine.alive and engine.num_running == 0


# ---- one bad sequence never hurts another --------------------------------------------------
def test_a_temperature_too_small_to_divide_by_is_greedy(models, tok):
    lm = models["llama"][1]
    ids = _prompts(tok)[0]
    with Engine(lm.model, lm.tokenizer) as engine:
        want = engine.complete(ids, GREEDY).token_ids
        for t in (1e-300, 1e-6, 5e-324):
            p = SamplingParams(max_tokens=12, temperature=t, seed=1, ignore_eos=True)
            assert engine.complete(ids, p).token_ids == want, t


def test_a_sequence_whose_sampling_fails_ends_alone(models, tok, monkeypatch):
    """15 sampled sequences give the same tokens alone and beside one whose sampler blows up
    mid-way (its logits overflow to inf, the softmax to NaN, torch.multinomial raises)."""
    import lmloop.engine.core as core

    class Poisoned(Sampler):
        calls = 0

        def pick(self, logits):
            self.calls += 1
            if self.p.seed == 666 and self.calls > 3:  # what temperature=1e-300 used to do
                return int(torch.multinomial(torch.softmax(logits / 1e-300, -1), 1))
            return super().pick(logits)

    monkeypatch.setattr(core, "Sampler", Poisoned)
    lm = models["llama"][1]
    prompts = [tok.encode(f"Once upon a time {i}") for i in range(15)]

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=10 + i % 4, temperature=1.0, seed=i, ignore_eos=True)

    with Engine(lm.model, lm.tokenizer, max_batch=16) as engine:
        alone = [engine.complete(p, params(i)) for i, p in enumerate(prompts)]
        handles = [engine.submit(p, params(i)) for i, p in enumerate(prompts[:7])]
        bad = engine.submit(prompts[0], SamplingParams(**{**params(0).__dict__, "seed": 666}))
        handles += [engine.submit(p, params(i + 7)) for i, p in enumerate(prompts[7:])]
        outs = list(bad)
        together = [h.result() for h in handles]
        assert engine.alive and engine.num_running == 0 and engine.num_waiting == 0
    assert outs[-1].finish_reason == "error"
    assert "sampling failed after 3 tokens" in outs[-1].error
    assert "probability tensor" in outs[-1].error
    assert [len(o.token_ids) for o in outs[:-1]] == [1, 1, 1]
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids and a.text == b.text and b.finish_reason == "length"


@pytest.mark.parametrize("int8", [False, True])
def test_the_engine_owns_its_weights_and_frees_the_model(tok, tmp_path, int8):
    """A server drops the loaded checkpoint once its engine is built (`lmloop.server.slot`):
    that frees the checkpoint only when neither the engine nor any runner tensor (a view of a
    memory-mapped file keeps the whole file resident) refers to it."""
    import gc
    import weakref

    save_hf(hf_llama(tok.vocab_size, tied=True), tok, tmp_path)
    lm = load_model(str(tmp_path))
    storages = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    storages |= {b.untyped_storage().data_ptr() for b in lm.model.buffers()}
    engine = Engine(lm.model, lm.tokenizer, max_batch=2, precision="int8" if int8 else "fp32")
    ids = _prompts(tok)[0]
    want = engine.complete(ids, GREEDY).token_ids
    r = engine.runner
    kept = [r.embed, r.cos, r.sin, r.final_norm, r.kv, *[t for n in r.norms for t in n]]
    if not int8:
        kept += [m.row_weight for layer in r.layers for m in layer]
    assert not {t.untyped_storage().data_ptr() for t in kept} & storages
    ref = weakref.ref(lm.model)
    lm.model = None
    gc.collect()
    assert ref() is None
    assert engine.complete(ids, GREEDY).token_ids == want
    engine.stop()


def _kv_dtype(engine):
    engine.runner.allocate()  # the cache is allocated at the first prefill
    return engine.runner.kv.dtype


def test_kv_cache_precision_follows_the_weights_and_is_refused_where_unsupported(models):
    llama, gpt2 = models["llama"][1], models["gpt2"][1]
    assert _kv_dtype(Engine(llama.model, llama.tokenizer, precision="int8")) == torch.int8
    assert _kv_dtype(Engine(llama.model, llama.tokenizer)) == torch.float32
    e = Engine(llama.model, llama.tokenizer, precision="int8", kv_int8=False)
    assert _kv_dtype(e) == torch.float32 and not e.kv_int8
    assert not Engine(gpt2.model, gpt2.tokenizer, precision="int8").kv_int8  # int8 weights only
    with pytest.raises(UserError, match="int8 KV cache"):
        Engine(gpt2.model, gpt2.tokenizer, kv_int8=True)


def _os_threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


def test_starting_an_engine_releases_the_callers_openmp_team(models):
    """A second live OpenMP team throttles the engine's threads (`lmloop.engine.threads`): the
    thread that starts an engine gives its own worker threads back first."""
    from lmloop.engine.threads import _openmp_runtime, release_openmp_team

    # The release is a no-op by design on other OpenMP runtimes (lmloop.engine.threads); the
    # Linux CPU wheel this project installs (torch==2.13.0) ships libgomp, so CI runs this.
    if _openmp_runtime() is None:
        pytest.skip("torch here does not run on GNU OpenMP")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(1 << 22).exp_()  # a parallel op: this thread now has a team of 2
        with_team = _os_threads()
        assert release_openmp_team()
        assert _os_threads() < with_team  # its worker thread exited
        torch.randn(1 << 22).exp_()  # a new team
        assert _os_threads() == with_team
        lm = models["llama"][1]
        engine = Engine(lm.model, lm.tokenizer, threads=1).start()  # its worker: 1 thread
        assert _os_threads() == with_team  # ours gone, the engine's worker thread came
        engine.stop()
    finally:
        torch.set_num_threads(before)
