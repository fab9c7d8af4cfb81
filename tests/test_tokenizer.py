"""The tokenizer wrapper's loading rules (training a tokenizer is tests/test_tokenizer_stage.py):
`tokenizers` alone for tokenizer.json folders (no torch on the data path), and the same ids,
text and chat rendering as transformers gives."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from modelkit import TEXTS, tiny_tokenizer
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


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def test_data_path_never_imports_torch(tmp_path):
    tiny_tokenizer().save(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("\n\n".join(TEXTS))
    code = (
        "import sys\n"
        "from lmloop.cli import main\n"
        f"argv = ['data', '--source', {str(tmp_path / 'a.txt')!r}, '--out', "
        f"{str(tmp_path / 'd')!r}, '--tokenizer', {str(tmp_path / 'tok')!r}]\n"
        "assert main(argv) == 0\n"
        "from lmloop.tokenizer import Tokenizer\n"
        f"tok = Tokenizer.load({str(tmp_path / 'd')!r})\n"
        "tok.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_same_as_transformers(tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer().save(tmp_path / "tok")
    ours, theirs = Tokenizer.load(tmp_path / "tok"), AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = TEXTS[0] + " <|im_start|>user\nhéllo  wörld<|im_end|>\n 42 "
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
        ids, skip_special_tokens=True
    )
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, len(theirs)
    )  # fmt: skip
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == (
            theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        )


def test_separator_is_endoftext_then_eos_else_a_one_line_error():
    tok = tiny_tokenizer()
    assert tok.separator_id == tok.backend.token_to_id("<|endoftext|>")
    # a vocabulary without <|endoftext|>: its EOS separates documents
    raw = RawTokenizer(models.WordLevel({"a": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    assert Tokenizer(raw, specials={"eos_token": "</s>"}).separator_id == 1
    with pytest.raises(UserError, match="no end-of-text token"):
        Tokenizer(raw, specials={}).separator_id  # noqa: B018 - the property raises


def test_a_long_text_encodes_to_the_same_ids_and_lets_other_threads_run():
    """A long prompt (a server tokenizes it on a worker thread) is encoded by the call that
    releases the GIL: the same ids as the short-text path, specials included, and another
    Python thread keeps running meanwhile (with the GIL held it gets a few percent)."""
    import threading
    import time

    tok = tiny_tokenizer()
    text = (TEXTS[0] + " <|im_start|>user\nhéllo  wörld<|im_end|>\n 42 ") * 2000
    ids = tok.encode(text)
    assert ids == tok.backend.encode(text, add_special_tokens=False).ids and len(ids) > 10_000

    def spins_during(work) -> float:
        count, stop = [0], [False]

        def spin() -> None:
            while not stop[0]:
                count[0] += 1

        th = threading.Thread(target=spin)
        th.start()
        time.sleep(0.05)
        c0, t0 = count[0], time.perf_counter()
        work()
        during, dt = count[0] - c0, time.perf_counter() - t0
        c1 = count[0]
        time.sleep(dt)
        alone = count[0] - c1
        stop[0] = True
        th.join()
        return during / max(1, alone)

    held = spins_during(lambda: tok.backend.encode(text, add_special_tokens=False))
    released = spins_during(lambda: tok.encode(text))
    assert released > 0.5 and released > 3 * held, (released, held)


def test_min_tokens_is_a_lower_bound_known_without_tokenizing():
    """`min_tokens` (on which a server refuses a prompt longer than the context before
    tokenizing it) never exceeds the real count, on texts built to catch it: whitespace of every
    kind, specials glued to words, digits, apostrophes, long words, and a larger vocabulary whose
    tokens span whitespace runs. Where a tokenizer may join two runs into one token it is 0."""
    import random

    from tokenizers import normalizers

    pieces = ["word", "don't", "42", "3.14", "héllo", "日本語", "🙂", "<|im_start|>", "<|im_end|>",
              "a-b", "x" * 40, "'s", "user"]  # fmt: skip
    spaces = ["", " ", "  ", "\n", "\t", "\u3000", "\u00a0", "\x1c", "\r\n", " \n   "]
    rng = random.Random(0)
    tokenizers = (tiny_tokenizer(), tiny_tokenizer(vocab_size=2000))
    for _ in range(300):
        text = "".join(rng.choice(pieces) + rng.choice(spaces) for _ in range(rng.randint(1, 40)))
        for tok in tokenizers:
            n, real = tok.min_tokens(text), len(tok.encode(text))
            assert n == len(text.split()) and n <= real, (text, n, real)

    # an added token holding a space joins two runs into one token: no bound there
    spaced = tiny_tokenizer()
    spaced.backend.add_tokens(["hello world"])
    assert len(spaced.encode("hello world")) == 1 and spaced.min_tokens("hello world") == 0
    # a normalizer may drop characters, a byte-level pass without its regex may merge across
    # spaces: no bound either
    norm = tiny_tokenizer()
    norm.backend.normalizer = normalizers.Replace(" ", "")
    assert norm.min_tokens("a b c d") == 0
    plain = tiny_tokenizer()
    plain.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    assert plain.min_tokens("a b c d") == 0
