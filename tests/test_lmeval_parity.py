"""Word perplexity, byte perplexity and bits per byte equal lm-evaluation-harness's, and lm-eval
scores a model served by `lmloop serve` as it scores the model itself.

lm-eval's `wikitext` task (same detokenizer, same word/byte counts: its own functions) runs
offline on local JSONL documents through `lm_eval.simple_evaluate` and its Hugging Face backend on
the tiny random Llama folder; lmloop scores the same documents through `load_model` with
`documents=True, detokenize="wikitext"` at the model's full context (lm-eval's window).

The served test runs lm-eval's `local-completions` model (echo + logprobs on /v1/completions, the
usual way to evaluate a served model) against `lmloop serve` on that folder, and its HF backend
on the folder, on a local multiple-choice task and the local wikitext task.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_perplexity import CORPUS, make_hf_model

from lmloop.evaluation import perplexity as ppl

TASK_DIR = Path(__file__).parent / "data" / "lmeval_wikitext_local"
TASK = "lmloop_wikitext_local"
MC_DIR = Path(__file__).parent / "data" / "lmeval_mc_local"
MC_TASK = "lmloop_mc_local"
MC_DOCS = [
    {"question": "The fox ran to the", "choices": ["river", "game", "army", "Japan"], "answer": 0},
    {"question": "It was released in January 2011 in", "choices": ["Japan", "the forest"],
     "answer": 0},
    {"question": "Every evening it watched the sun go", "choices": ["down", "up", "Sega"],
     "answer": 0},
    {"question": "As with previous games , the player 's squad fights",
     "choices": ["battles", "the river", "morning"], "answer": 0},
    {"question": "Once upon a time there was a little", "choices": ["fox", "unit", "series"],
     "answer": 0},
    {"question": "", "choices": ["Valkyria Chronicles", "Calamity Raven"], "answer": 1},
]  # fmt: skip


def write_local_task(dest: Path, pages: list[str]) -> Path:
    """A task folder: the YAML template filled with a JSONL of `pages` and a cache under dest."""
    dest.mkdir(parents=True, exist_ok=True)
    data = dest / "docs.jsonl"
    data.write_text("".join(json.dumps({"page": p}) + "\n" for p in pages), encoding="utf-8")
    yaml = (TASK_DIR / "task.yaml.in").read_text(encoding="utf-8")
    yaml = yaml.replace("@DATA_FILE@", str(data)).replace("@CACHE_DIR@", str(dest / "cache"))
    (dest / "task.yaml").write_text(yaml, encoding="utf-8")
    shutil.copy(TASK_DIR / "preprocess_local.py", dest / "preprocess_local.py")
    return dest


@pytest.mark.slow
def test_word_byte_figures_equal_lm_eval_wikitext(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmloop.models.io import load_model

    # Context 32: the longer pages span several rolling windows on both sides.
    model_dir = make_hf_model(tmp_path / "model", context=32)
    pages = [*CORPUS, CORPUS[0] + CORPUS[1]]
    task_dir = write_local_task(tmp_path / "task", pages)

    lm = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32")
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=False,
        bootstrap_iters=0,
    )
    theirs = res["results"][TASK]

    loaded = load_model(str(model_dir))
    ours = ppl.evaluate_texts(
        loaded, pages, documents=True, detokenize="wikitext", show_progress=False
    )
    assert ours["protocol"]["window"] == 32
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[key] == pytest.approx(theirs[f"{key},none"], rel=5e-3), key
    # The agreement is in fact far tighter than the stated tolerance.
    assert ours["bits_per_byte"] == pytest.approx(theirs["bits_per_byte,none"], rel=1e-5)


def write_mc_task(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    data = dest / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS), encoding="utf-8")
    yaml = (MC_DIR / "task.yaml.in").read_text(encoding="utf-8")
    yaml = yaml.replace("@DATA_FILE@", str(data)).replace("@CACHE_DIR@", str(dest / "cache"))
    (dest / "task.yaml").write_text(yaml, encoding="utf-8")
    return dest


@pytest.mark.slow
def test_lm_eval_local_completions_on_lmloop_serve_equals_its_hf_backend(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager
    from test_server_kit import Server

    ctx = 64  # the model's context: the longer pages span several rolling windows
    model_dir = make_hf_model(tmp_path / "model", context=ctx)
    write_local_task(tmp_path / "tasks" / "wikitext", [*CORPUS, CORPUS[0] + CORPUS[1]])
    write_mc_task(tmp_path / "tasks" / "mc")
    # local-completions keeps one token of max_length for the answer and one for the rolling
    # windows' context, so its windows are the HF backend's at max_length - 2.
    hf = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32",
              max_length=ctx - 2)  # fmt: skip

    def run(lm) -> dict:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[MC_TASK, TASK],
            task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
            log_samples=True,
            bootstrap_iters=0,
        )

    theirs = run(hf)
    # fp32: parity with the HF backend is a property of the fp32 weights (auto would quantize)
    server = Server(model_dir, tmp_path, "--model-name", "tiny", "--precision", "fp32")
    try:
        server.wait_ready()
        api = LocalCompletionsAPI(
            base_url=server.url + "/v1/completions", model="tiny", tokenizer=str(model_dir),
            tokenizer_backend="huggingface", max_length=ctx, batch_size=4,
        )  # fmt: skip
        ours = run(api)
    finally:
        assert server.stop() == 0, server.output()[-3000:]

    def lls(res: dict, task: str) -> list[float]:  # (loglikelihood, is_greedy) or a rolling sum
        out = [r for s in res["samples"][task] for r in s["filtered_resps"]]
        return [float(r[0] if isinstance(r, list | tuple) else r) for r in out]

    for task, n in ((MC_TASK, sum(len(d["choices"]) for d in MC_DOCS)), (TASK, 4)):
        assert len(lls(ours, task)) == len(lls(theirs, task)) == n, task
        assert lls(ours, task) == pytest.approx(lls(theirs, task), abs=1e-4), task

    def greedy(res: dict) -> list[bool]:
        return [bool(r[1]) for s in res["samples"][MC_TASK] for r in s["filtered_resps"]]

    assert greedy(ours) == greedy(theirs)
    for key in ("acc,none", "acc_norm,none"):
        assert ours["results"][MC_TASK][key] == theirs["results"][MC_TASK][key], key
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"][TASK][key] == pytest.approx(theirs["results"][TASK][key], rel=1e-4)
    print(
        "served vs HF: acc", ours["results"][MC_TASK]["acc,none"],
        "word ppl", ours["results"][TASK]["word_perplexity,none"],
        theirs["results"][TASK]["word_perplexity,none"],
    )  # fmt: skip
