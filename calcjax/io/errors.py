"""The error type of bad input files: it names the file and the reason (batch jobs record both and go on)."""

from __future__ import annotations


class InputError(ValueError):
    """A file that cannot be used, with ``path``, ``reason`` and a short machine-readable ``kind``."""

    kind = "unreadable"

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def reason_of(e: Exception) -> str:
    """An error's reason: an InputError's own (no path), else its type and message (cut to 300 chars)."""
    return getattr(e, "reason", None) or f"{e.__class__.__name__}: {str(e)[:300]}"
