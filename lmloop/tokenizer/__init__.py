"""The tokenizer every stage uses: one wrapper over a `tokenizers.Tokenizer` and a chat template.

It loads a tokenizer from wherever lmloop finds one: a `tokenizer.json` file, a folder holding
one (lmloop artifacts, Hugging Face model folders; special tokens and the chat template come from
its `tokenizer_config.json`), a train run, or an installed model's short name. Only a GGUF file's
embedded vocabulary and a folder without `tokenizer.json` go through `transformers` (which
imports torch); everything else, the data stage included, needs `tokenizers` and `jinja2` alone.
It owns lmloop's special tokens and its chat template for the models it trains (ChatML, the same
markup SmolLM2 uses), so a model trained here and a pretrained one are chatted with the same way.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from lmloop.artifacts import sha256_bytes
from lmloop.errors import UserError
from lmloop.registry import spec as modelspec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, PAD, IM_START, IM_END]
SPECIALS = ("bos_token", "eos_token", "pad_token")
LONG_TEXT = 4096  # characters from which `encode` lets other threads run while it works

# ChatML, as the models lmloop trains are taught it (and as SmolLM2-Instruct already speaks it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """`encode`/`decode`, special ids, chat rendering; `.backend` is the `tokenizers.Tokenizer`.

    `specials` maps `bos_token`/`eos_token`/`pad_token` to their strings (absent: none).
    """

    def __init__(
        self,
        backend: Backend,
        source: str = "",
        *,
        specials: dict[str, str] | None = None,
        chat_template: str | None = None,
    ):
        self.backend, self.source = backend, source
        vocab = backend.get_vocab()
        if specials is None:  # a bare tokenizer.json: lmloop's own special tokens, when present
            specials = (
                {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT} if ENDOFTEXT in vocab else {}
            )
            specials |= {"pad_token": PAD} if PAD in vocab else {}
        self.specials = {k: v for k, v in specials.items() if v}
        if chat_template is None and IM_START in vocab:
            chat_template = CHAT_TEMPLATE
        self.chat_template = chat_template

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str | Path) -> Tokenizer:
        """From a tokenizer.json, a folder holding one (or `tokenizer/`), a .gguf file, a train
        run (its best checkpoint's), or an installed model's short name."""
        p = Path(spec).expanduser()
        if p.is_dir() and modelspec.is_run_dir(p):
            p = modelspec.run_checkpoint(p)
        if p.is_file() and p.suffix == ".gguf":
            return cls._from_transformers(p, gguf_file=p.name)
        if p.is_file() and p.name.endswith(".json"):
            return cls(_backend(p), str(p))
        if p.is_dir():
            if (p / "tokenizer").is_dir() and not (p / "tokenizer.json").exists():
                return cls.load(p / "tokenizer")
            if (p / "tokenizer.json").is_file():
                return cls._from_folder(p)
            if (p / "tokenizer_config.json").is_file():  # no tokenizer.json: converted by HF
                return cls._from_transformers(p)
        if not p.exists() and str(spec) in (installed := modelspec.installed_models()):
            return cls.load(installed[str(spec)])
        raise UserError(
            f"tokenizer not found: {spec} (installed model names: "
            f"{', '.join(sorted(modelspec.installed_models())) or 'none'})",
            hint="pass a tokenizer.json, a tokenizer or model folder, a .gguf file, a train run "
            "or an installed model name",
        )

    @classmethod
    def _from_folder(cls, folder: Path) -> Tokenizer:
        try:
            config = _read_config(folder / "tokenizer_config.json")
        except UserError as e:  # said out loud: the config's special tokens and template are lost
            log.warning(
                "cannot load the tokenizer in %s with its tokenizer_config.json (%s); using the "
                "bare tokenizer.json, without the config's special-token settings or chat template",
                folder,
                e.message,
            )
            return cls(_backend(folder / "tokenizer.json"), str(folder))
        if not any(k in config for k in SPECIALS):
            config |= _read_config(folder / "special_tokens_map.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        specials = {k: _content(config.get(k)) for k in SPECIALS} if config else None
        return cls(_backend(folder / "tokenizer.json"), str(folder), specials=specials,
                   chat_template=template)  # fmt: skip

    @classmethod
    def _from_transformers(cls, path: Path, **kw: Any) -> Tokenizer:
        # lazy: imports torch (~2.4 s); only GGUF files and folders without tokenizer.json
        from transformers import AutoTokenizer

        where = str(path.parent) if "gguf_file" in kw else str(path)
        try:
            hf = AutoTokenizer.from_pretrained(where, local_files_only=True, **kw)
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad user file
            why = f"{type(e).__name__}: {e}"
            raise UserError(f"cannot load the tokenizer in {path}: {why}") from None
        return cls.from_hf(hf, str(path))

    @classmethod
    def from_hf(cls, hf: PreTrainedTokenizerBase, source: str = "") -> Tokenizer:
        """Wrap a `transformers` fast tokenizer (a GGUF file's, a hub model's)."""
        if getattr(hf, "backend_tokenizer", None) is None:
            raise UserError(f"{source} holds a slow tokenizer; lmloop needs tokenizer.json")
        specials = {k: _content(getattr(hf, k, None)) for k in SPECIALS}
        return cls(hf.backend_tokenizer, source, specials=specials, chat_template=hf.chat_template)

    @classmethod
    def from_backend(cls, backend: Backend, source: str = "") -> Tokenizer:
        """Wrap a `tokenizers.Tokenizer`, wiring lmloop's special tokens when present."""
        return cls(backend, source)

    # ---- properties ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab()

    def _id(self, key: str) -> int | None:
        token = self.specials.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def separator_id(self) -> int:
        """The id written between documents: <|endoftext|> when the vocabulary has it, else EOS."""
        eot = self.backend.token_to_id(ENDOFTEXT)
        if eot is not None:
            return int(eot)
        if self.eos_id is not None:
            return int(self.eos_id)
        raise UserError(f"tokenizer {self.source} has no end-of-text token to separate documents")

    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end a generation: EOS and the chat end-of-turn marker."""
        return {i for i in (self.eos_id, self.backend.token_to_id(IM_END)) if i is not None}

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.backend.to_str().encode())

    # ---- use -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if len(text) < LONG_TEXT:
            return self.backend.encode(text, add_special_tokens=False).ids
        # The batch call releases the GIL while it works (`encode` holds it): a 30,000-token
        # prompt takes ~70 ms, in which a server's event loop and engine thread would stand
        # still (bench/soak.py, an abusive client). The same ids.
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return batch([text], add_special_tokens=False)[0].ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on `len(encode(text))` known without tokenizing: the text's whitespace-
        separated runs, when each is sure to become at least one token of its own (a byte-level
        pre-tokenizer splitting by its regex, which never joins two runs into one piece or
        drops a byte; no normalizer; no added token holding whitespace); else 0. A server
        refuses a prompt with more runs than the context before spending ~70 ms (30k tokens)
        and tens of MB tokenizing it."""
        return len(text.split()) if self._runs_are_tokens else 0

    @functools.cached_property
    def _runs_are_tokens(self) -> bool:
        b = self.backend
        pre = b.pre_tokenizer
        if b.normalizer is not None or type(pre).__name__ != "ByteLevel" or not pre.use_regex:
            return False
        added = b.get_added_tokens_decoder().values()
        return not any(any(c.isspace() for c in t.content) for t in added)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        # transformers adds no clean-up for byte-level BPE (v5 ignores it even when asked)
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        return _compile(self.chat_template or CHAT_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.specials
        )

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (loadable by AutoTokenizer)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.specials,
            "model_max_length": 1 << 30,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        config = {k: v for k, v in config.items() if v is not None}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _backend(path: Path) -> Backend:
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad user file
        raise UserError(f"{path} is not a valid tokenizer.json: {e}") from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable: {type(e).__name__}: {e}") from None
    return data if isinstance(data, dict) else {}


def _content(token: Any) -> str | None:
    """A special token as configs write it: a string, or `{"content": ...}` (AddedToken)."""
    token = token.get("content") if isinstance(token, dict) else getattr(token, "content", token)
    return token if isinstance(token, str) and token else None


@functools.cache
def _compile(template: str) -> Any:
    """A chat template compiled as transformers compiles it (sandboxed, trimmed blocks); once."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)  # fmt: skip

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
