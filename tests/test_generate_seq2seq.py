"""`lmloop generate` on encoder-decoder models, through the engine: the prompt is the encoder's
input and the printed text is the model's own decode (greedy equal to a one-at-a-time greedy
through the model, seeded sampling equal to a draw written out here, logprobs equal to the
model's log-softmax), `--chat` answers the last user turn, and bad input is a one-line error,
exit 2.

A tiny random seq2seq model (hidden 32, context 64) with weights spread wide enough that its
greedy outputs are neither empty nor constant, saved as an lmloop model dir once per module.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_seq2seq import greedy, saved_seq2seq

from lmloop.cli import main
from lmloop.engine.core import Engine
from lmloop.evaluation import seq2seq as eval_seq2seq

PROMPTS = ["the cat sat on the mat", "a dog", "red blue green red"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return saved_seq2seq(tmp_path_factory.mktemp("s2s"))


def _input(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok.encode(text) + [tok.eos_id]])  # as `lmloop data` ends an input


def _want(tiny: dict, text: str, n: int) -> list[int]:
    """The model's greedy output (start and stop token dropped), decoded one step at a time."""
    tok, model = tiny["tok"], tiny["model"]
    stops = set(tok.stop_ids) | {model.config.eos_token_id}
    out = greedy(model, _input(tok, text), n, stops)[1:]
    return out[:-1] if out and out[-1] in stops else out


def _generate(tiny: dict, capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["generate", "--model", str(tiny["dir"]), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_greedy_output_is_the_models_own_greedy_decode(tiny, capsys):
    tok = tiny["tok"]
    wants = [_want(tiny, p, 12) for p in PROMPTS]
    assert all(wants) and len(set(map(tuple, wants))) > 1  # the test can tell outputs apart
    for prompt, want in zip(PROMPTS, wants):
        rc, out, _ = _generate(tiny, capsys, "--prompt", prompt, "--temperature", "0",
                               "--max-tokens", "12", "--json")  # fmt: skip
        assert rc == 0
        got = json.loads(out)
        assert got["token_ids"] == want
        assert got["text"] == tok.decode(want, skip_special_tokens=True)
        assert got["prompt_tokens"] == _input(tok, prompt).shape[1]
        assert got["finish_reason"] == ("length" if len(want) == 12 else "stop")
    # Plain output: the same text on stdout, statistics on stderr.
    rc, out, err = _generate(tiny, capsys, "--prompt", PROMPTS[0], "--temperature", "0",
                             "--max-tokens", "12")  # fmt: skip
    assert rc == 0 and out == tok.decode(wants[0], skip_special_tokens=True) + "\n"
    assert "new tokens" in err
    # A stop string cuts the text before it, and is never printed.
    text = tok.decode(wants[0], skip_special_tokens=True)
    stop = text[len(text) // 2 :][:2]
    rc, out, _ = _generate(tiny, capsys, "--prompt", PROMPTS[0], "--temperature", "0",
                           "--max-tokens", "12", "--stop", stop, "--json")  # fmt: skip
    got = json.loads(out)
    assert rc == 0 and got["text"] == text[: text.find(stop)] and got["finish_reason"] == "stop"


def test_prompts_file_keeps_order_and_equals_greedy(tiny, capsys, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    rc, out, _ = _generate(tiny, capsys, "--prompts", str(f), "--temperature", "0",
                           "--max-tokens", "8")  # fmt: skip
    assert rc == 0
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in recs] == [0, 1, 2]
    tok = tiny["tok"]
    assert [r["text"] for r in recs] == [
        tok.decode(_want(tiny, p, 8), skip_special_tokens=True) for p in PROMPTS
    ]


def test_seeded_sampling_is_a_softmax_draw_per_step(tiny, capsys):
    """--temperature 0.7 --top-p 1: each token drawn from softmax(logits / 0.7) with a
    generator seeded by --seed, as the engine's sampler draws for decoder-only models."""
    tok, model = tiny["tok"], tiny["model"]
    c = model.config
    stops = set(tok.stop_ids) | {c.eos_token_id}
    g = torch.Generator().manual_seed(7)
    enc, mask = model.encode(_input(tok, PROMPTS[0]))
    cache = model.new_cache(1, 16)
    want, nxt = [], c.decoder_start_token_id
    with torch.no_grad():
        for t in range(16):
            logits = model.decode(torch.tensor([[nxt]]), enc, mask, torch.tensor([[t]]), cache)
            enc = mask = None
            probs = torch.softmax(logits[0, -1].float() / 0.7, -1)
            # the first token whose cumulative probability reaches a uniform draw in (0, 1]
            u = 1.0 - float(torch.rand((), generator=g))
            nxt = int((torch.cumsum(probs, 0) < u * float(probs.sum())).sum())
            if nxt in stops:
                break
            want.append(nxt)
    args = ["--prompt", PROMPTS[0], "--temperature", "0.7", "--top-p", "1", "--seed", "7",
            "--max-tokens", "16", "--json"]  # fmt: skip
    rc, out, _ = _generate(tiny, capsys, *args)
    assert rc == 0 and json.loads(out)["token_ids"] == want
    assert want != _want(tiny, PROMPTS[0], 16)  # sampling, not greedy


def test_chat_and_logprobs(tiny, capsys):
    """--chat: the prompt is the last user turn (the system message is not read); --logprobs:
    each chosen token's logprob is the model's log-softmax at that step, teacher-forced."""
    tok, model = tiny["tok"], tiny["model"]
    want = _want(tiny, PROMPTS[1], 10)
    rc, out, _ = _generate(tiny, capsys, "--prompt", PROMPTS[1], "--chat", "--system", "be kind",
                           "--temperature", "0", "--max-tokens", "10", "--json",
                           "--logprobs", "2")  # fmt: skip
    assert rc == 0
    got = json.loads(out)
    assert got["token_ids"] == want
    c = model.config
    dec = torch.tensor([[c.decoder_start_token_id, *want[:-1]]])
    with torch.no_grad():
        lps = torch.log_softmax(model(_input(tok, PROMPTS[1]), dec)[0].float(), -1)
    assert [lp["id"] for lp in got["logprobs"]] == want
    for t, (lp, tid) in enumerate(zip(got["logprobs"], want)):
        assert abs(lp["logprob"] - float(lps[t, tid])) < 1e-4
        assert lp["top"][0]["id"] == tid  # greedy: the chosen token is the most likely


def test_bad_input_is_one_line_and_exit_2(tiny, capsys, tmp_path):
    long = " ".join(["cat"] * 100)
    cases = [
        (["--prompt", "a dog", "--max-tokens", "65"], "decoder's context of 64 tokens"),
        (["--prompt", long], "longer than the context of 64 tokens"),
        (["--prompt", "a dog", "--int8"], "--int8 applies to decoder-only models"),
    ]
    for args, msg in cases:
        rc, _, err = _generate(tiny, capsys, *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and msg in lines[0], (args, lines)


def test_eval_decodes_through_the_engine_like_generate(tiny, monkeypatch):
    """One decode path: `lmloop eval`'s greedy outputs come from the engine `generate` runs on,
    each input submitted to it, and equal the one-at-a-time greedy decode."""
    tok, model = tiny["tok"], tiny["model"]
    submitted: list[list[int]] = []
    submit = Engine.submit
    monkeypatch.setattr(
        Engine, "submit", lambda e, ids, p=None: submitted.append(ids) or submit(e, ids, p)
    )
    inputs = [_input(tok, p)[0].tolist() for p in PROMPTS]
    stops = set(tok.stop_ids) | {model.config.eos_token_id}
    got = eval_seq2seq.greedy_decode(model, inputs, tokenizer=tok, max_new_tokens=12,
                                     stop_ids=stops, show_progress=False)  # fmt: skip
    assert submitted == inputs
    assert got == [_want(tiny, p, 12) for p in PROMPTS]
