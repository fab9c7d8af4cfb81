"""Word perplexity, byte perplexity and bits per byte equal lm-evaluation-harness's.

lm-eval's `wikitext` task (same detokenizer, same word/byte counts: its own functions) runs
offline on local JSONL documents through `lm_eval.simple_evaluate` and its Hugging Face backend on
the tiny random Llama folder; lmloop scores the same documents through `load_model` with
`documents=True, detokenize="wikitext"` at the model's full context (lm-eval's window).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_perplexity import CORPUS, make_hf_model

from lmloop import perplexity as ppl

TASK_DIR = Path(__file__).parent / "data" / "lmeval_wikitext_local"
TASK = "lmloop_wikitext_local"


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

    from lmloop.modelio import load_model

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
