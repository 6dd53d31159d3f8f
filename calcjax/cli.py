"""The one-line error of a command-line job: what went wrong and what to do, never a traceback.

A batch job's own failures per scan go to ``errors.jsonl`` and the job goes on; what stops the whole job
(another job holds the output folder, a damaged model, a full disk, a read-only folder, nothing to score)
is printed as ``<prog>: error: <reason>`` on stderr with exit status 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


def describe_os_error(e: OSError) -> str:
    """An OSError as one line, with the hint that fits the common cases."""
    hint = {
        errno.ENOSPC: "the disk is full: free space and rerun (finished work is kept)",
        errno.EDQUOT: "the disk quota is used up: free space and rerun (finished work is kept)",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.EACCES: "permission denied: choose a folder you may write to",
        errno.EPERM: "operation not permitted: choose a folder you may write to",
    }.get(e.errno)
    where = f" ({e.filename})" if e.filename else ""
    text = e.strerror or str(e)
    return f"{text}{where}" + (f": {hint}" if hint else "")


def run_or_exit(prog: str, job: Callable[[], object], user_errors: tuple[type[BaseException], ...] = ()):
    """``job()``; a ``user_errors`` instance or an OSError becomes one stderr line and exit status 2."""
    try:
        return job()
    except user_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"{prog}: error: {describe_os_error(e)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
