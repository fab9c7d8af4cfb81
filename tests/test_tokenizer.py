"""The tokenizer wrapper's loading rules (training a tokenizer is tests/test_tokenizer_stage.py)."""

from __future__ import annotations

import logging

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmloop.errors import UserError
from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer


def _tokenizer_json(path):
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS)
    raw.train_from_iterator(["the mill by the river"] * 20, trainer)
    raw.save(str(path))


def test_a_broken_config_falls_back_to_tokenizer_json_and_says_so(tmp_path, caplog):
    _tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Pre')  # torn
    logger = logging.getLogger("lmloop.tokenizer")  # lmloop's loggers don't propagate to root
    logger.addHandler(caplog.handler)
    try:
        tok = Tokenizer.load(tmp_path)
    finally:
        logger.removeHandler(caplog.handler)
    assert tok.decode(tok.encode("the mill")) == "the mill"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and all("bare tokenizer.json" in m and str(tmp_path) in m for m in warned)


def test_a_broken_config_without_tokenizer_json_fails_with_the_reason(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Pre')  # torn
    with pytest.raises(UserError, match=r"cannot load the tokenizer in .*: JSONDecodeError: "):
        Tokenizer.load(tmp_path)
