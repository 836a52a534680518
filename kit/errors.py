"""User-facing errors: the CLI prints these as one clear message, never a traceback."""

from __future__ import annotations


class KitError(Exception):
    """A user mistake or bad input, with a message that names the file, record and reason."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
