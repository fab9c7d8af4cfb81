"""The project's own exception for user mistakes.

Raise `UserError` for anything a user can fix (a missing file, a bad value, the wrong kind of
artifact). The CLI catches it once, prints one line and exits with status 2; `--debug` shows the
traceback. Internal invariants use `assert`; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A mistake the user can fix: one line saying what failed, what was seen, what to do."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = " ".join(str(message).split())  # always one line
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
