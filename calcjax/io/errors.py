"""The error type of bad input files: it names the file and the reason (batch jobs record both and go on)."""

from __future__ import annotations


class InputError(ValueError):
    """A file that cannot be used, with ``path``, ``reason`` and a short machine-readable ``kind``."""

    kind = "unreadable"

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")
