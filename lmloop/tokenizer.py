"""The tokenizer every stage uses: one wrapper over a Hugging Face fast tokenizer.

It loads a tokenizer from wherever lmloop finds one: a `tokenizer.json` file, a folder holding
one (lmloop artifacts and Hugging Face model folders), or a GGUF file's embedded vocabulary
(through `transformers`' GGUF reader). It owns lmloop's special tokens and its chat template
for the models it trains (ChatML, the same markup SmolLM2 uses), so a model trained here and a
pretrained one are chatted with the same way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmloop.errors import UserError

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, PAD, IM_START, IM_END]

# ChatML, as the models lmloop trains are taught it (and as SmolLM2-Instruct already speaks it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """`encode`/`decode`, special ids, chat rendering; `.hf` is the underlying fast tokenizer."""

    def __init__(self, hf: Any, source: str = ""):
        self.hf = hf
        self.source = source
        if getattr(hf, "chat_template", None) is None and IM_START in hf.get_vocab():
            hf.chat_template = CHAT_TEMPLATE

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        p = Path(path)
        if p.is_file() and p.suffix == ".gguf":
            try:
                hf = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            except Exception as e:  # noqa: BLE001 - any reader failure is a bad user file
                raise UserError(f"cannot read a tokenizer from GGUF file {p}: {e}") from None
            return cls(hf, str(p))
        if p.is_file() and p.name.endswith(".json"):
            return cls._from_json_file(p)
        if p.is_dir():
            if (p / "tokenizer").is_dir() and not (p / "tokenizer.json").exists():
                return cls.load(p / "tokenizer")
            if (p / "tokenizer_config.json").exists() or (p / "tokenizer.json").exists():
                try:
                    hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
                except Exception as e:  # noqa: BLE001 - fall back to the bare tokenizer.json
                    why = f"{type(e).__name__}: {e}"
                    if not (p / "tokenizer.json").exists():
                        raise UserError(f"cannot load the tokenizer in {p}: {why}") from None
                    # Said out loud: the config's special tokens and chat template are lost.
                    log.warning(
                        "cannot load the tokenizer in %s with its tokenizer_config.json (%s); "
                        "using the bare tokenizer.json, without the config's special-token "
                        "settings or chat template",
                        p,
                        why,
                    )
                    return cls._from_json_file(p / "tokenizer.json")
                if not isinstance(hf, PreTrainedTokenizerFast):
                    raise UserError(f"{p} holds a slow tokenizer; lmloop needs tokenizer.json")
                return cls(hf, str(p))
        raise UserError(
            f"no tokenizer found at {p}",
            hint="pass a tokenizer.json, a folder holding one, or a .gguf file",
        )

    @classmethod
    def _from_json_file(cls, path: Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path} is not a valid tokenizer.json: {e}") from None
        return cls.from_backend(backend, source=str(path))

    @classmethod
    def from_backend(cls, backend: Any, source: str = "") -> Tokenizer:
        """Wrap a `tokenizers.Tokenizer`, wiring lmloop's special tokens when present."""
        from transformers import PreTrainedTokenizerFast

        vocab = backend.get_vocab()
        kw: dict[str, Any] = {}
        if ENDOFTEXT in vocab:
            kw.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT)
        if PAD in vocab:
            kw["pad_token"] = PAD
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, **kw)
        if IM_START in vocab:
            hf.chat_template = CHAT_TEMPLATE
        return cls(hf, source)

    # ---- properties ----------------------------------------------------------------------
    @property
    def backend(self) -> Any:
        """The `tokenizers.Tokenizer` (fast batch encoding for data preparation)."""
        return self.hf.backend_tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end a generation: EOS and the chat end-of-turn marker."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        im_end = self.hf.get_vocab().get(IM_END)
        if im_end is not None:
            ids.add(im_end)
        return ids

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    @property
    def sha256(self) -> str:
        from lmloop.artifacts import sha256_bytes

        return sha256_bytes(self.backend.to_str().encode())

    # ---- use -----------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        template = self.chat_template or CHAT_TEMPLATE
        return self.hf.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (loadable by AutoTokenizer)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(d))
        cfg = d / "tokenizer_config.json"
        if cfg.exists() and self.chat_template:
            data = json.loads(cfg.read_text())
            data.setdefault("chat_template", self.chat_template)
            cfg.write_text(json.dumps(data, indent=2))
