"""The engine's intra-op threads per step: small decode steps on one thread (issue 18, item 2)."""

from __future__ import annotations

import pytest
import torch
from modelkit import lmloop_llama, tiny_tokenizer

from lmloop.engine import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _traced(engine: Engine) -> list[tuple[str, int, int]]:
    """Record (call, rows, intra-op threads) for every prefill and decode of the runner."""
    seen: list[tuple[str, int, int]] = []
    runner = engine.runner
    prefill, decode = runner.prefill, runner.decode

    def traced_prefill(row, ids, **kw):
        seen.append(("prefill", 1, torch.get_num_threads()))
        return prefill(row, ids, **kw)

    def traced_decode(tokens, positions):
        seen.append(("decode", len(tokens), torch.get_num_threads()))
        return decode(tokens, positions)

    runner.prefill, runner.decode = traced_prefill, traced_decode
    return seen


@pytest.mark.parametrize("rows", [0, 1, 2])
def test_small_decode_steps_run_on_one_thread(tok, rows):
    model = lmloop_llama(tok.vocab_size)
    prompts = [tok.encode(t) for t in ("Once upon a time", "The quick brown fox", "12 apples")]
    ref = Engine(model, tok, max_batch=4, threads=1, prefix_cache_mb=0)
    with ref:
        want = [ref.complete(p, GREEDY).token_ids for p in prompts]
    engine = Engine(model, tok, max_batch=4, threads=2, single_thread_rows=rows, prefix_cache_mb=0)
    seen = _traced(engine)
    with engine:
        assert engine.complete(prompts[0], GREEDY).token_ids == want[0]  # one row alone
        with engine._cv:  # then three admitted in one iteration, decoded together
            handles = [engine.submit(p, GREEDY) for p in prompts]
        assert [h.result().token_ids for h in handles] == want
    assert {n for call, n, _ in seen if call == "decode"} == {1, 3}
    for call, n, threads in seen:
        assert threads == (1 if call == "decode" and n <= rows else 2), (call, n, threads)


def test_the_release_finds_torchs_openmp_beside_another_wheels():
    """scikit-learn (the loop's judge) maps a libgomp of its own; the release must still pause
    torch's team, not the other runtime's (seen: it picked the first path in sorted order)."""
    code = (
        "import os, sklearn.linear_model, torch\n"
        "from lmloop.engine.threads import _openmp_runtime, release_openmp_team\n"
        "if _openmp_runtime() is None: raise SystemExit(0)\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'scikit_learn.libs/libgomp' in maps, 'scikit-learn bundles no libgomp here'\n"
        "n = lambda: len(os.listdir('/proc/self/task'))\n"
        "torch.set_num_threads(2); torch.randn(1 << 22).exp_()\n"
        "with_team = n()\n"
        "assert release_openmp_team()\n"
        "assert n() < with_team, (n(), with_team)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
