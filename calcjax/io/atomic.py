"""Whole files written atomically: a temporary name in the same folder, fsync, then a rename.

A reader never sees a half-written file, and a process killed mid-write leaves at most its temporary
(``<name>.tmp-<pid>``, which a rerun may delete), never a damaged file under the final name. No jax here.
"""

from __future__ import annotations

import os


def write_atomic(path: str, data: str | bytes) -> None:
    """``data`` (text or bytes) to ``path`` via ``<path>.tmp-<pid>`` and ``os.replace``; on any failure
    the temporary is removed and ``path`` is left as it was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
