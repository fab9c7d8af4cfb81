"""lm-eval's own wikitext definitions, re-exported for the local task beside this file."""

from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401
    process_results,
    wikitext_detokenizer,
)
