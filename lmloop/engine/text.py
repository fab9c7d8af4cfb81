"""Token ids -> text, streamed: whole characters only, stop strings never emitted.

`TextStream.push(token_id)` returns the text that may be shown now. Two rules:

* UTF-8 safety. A byte-level tokenizer may split one character over several tokens; decoding a
  prefix then ends in U+FFFD. We decode a small window of ids and emit the new part only when
  it no longer ends in U+FFFD (the offsets scheme of Hugging Face's `TextStreamer` and vLLM's
  incremental detokenizer), so a split character is held until complete. A few prompt tokens seed
  the window so tokenizers that drop a leading space at the start of a decode (SentencePiece's
  Metaspace) still space the first word correctly.
* Stop strings. Text that could be the start of a stop string is held back until it either
  completes the stop (the stream ends before it, the stop text is never emitted) or cannot.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int], stop: list[str]):
        self._decode = decode
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0  # window start
        self._read = len(self.ids)  # ids before this were already turned into text
        self._stop = list(stop)
        self._held = ""  # decoded, but possibly the start of a stop string
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text to emit now, whether a stop string was reached)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return "", False  # an incomplete character: wait for its remaining bytes
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return self._accept(delta)

    def _accept(self, delta: str) -> tuple[str, bool]:
        buf = self._held + delta
        if not self._stop:
            self.text += buf
            return buf, False
        # A stop can only start inside `buf`: text that might begin one was never emitted.
        hits = [i for i in (buf.find(s) for s in self._stop) if i >= 0]
        if hits:
            out = buf[: min(hits)]
            self._held = ""
            self.text += out
            return out, True
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        out, self._held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out, False

    def flush(self) -> str:
        """At the end of a generation that did not hit a stop: release held-back text.

        A trailing incomplete character (generation cut mid-character) is dropped, never shown
        as U+FFFD.
        """
        tail = self._decode(self.ids[self._prefix :])
        before = self._decode(self.ids[self._prefix : self._read])
        extra = tail[len(before) :].rstrip(REPLACEMENT) if len(tail) > len(before) else ""
        out, hit = self._accept(extra) if extra else ("", False)
        if not hit:
            out += self._held
            self.text += self._held
        self._held = ""
        return out
