"""Command-line plumbing: the one-line error of a job, and the console commands' entry point.

The one-line error: what went wrong and what to do, never a traceback.

A batch job's own failures per scan go to ``errors.jsonl`` and the job goes on; what stops the whole job
(another job holds the output folder, a damaged model, a full disk, a read-only folder, nothing to score)
is printed as ``<prog>: error: <reason>`` on stderr with exit status 2. Anything else is a bug and keeps
its traceback.

The console commands (``calcjax-score``, ``calcjax-train``, ``calcjax-build``, ``calcjax-phantom``,
``calcjax-compare``, ``calcjax-check-install``; ``[project.scripts]`` in pyproject.toml) run the same absl
programs as their ``python -m`` forms through :func:`run_command`, whose ``--help`` starts with the
module's docstring (its example command lines), as ``python -m`` shows it.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Sequence

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


def run_command(
    command: str,
    module: str,
    doc: str | None,
    main: Callable[[list[str]], object],
    define_flags: Callable[[], None] | None = None,
    required: Sequence[str] = (),
) -> None:
    """Runs an absl ``main`` as the console command ``command`` (the same program as ``python -m module``).

    absl's ``--help`` prints the ``__main__`` module's docstring; a console command's ``__main__`` is pip's
    wrapper, which has none, so the program's own docstring (``doc``) is put there first, headed by the
    command's two names. ``define_flags`` (for modules that define their flags only when run) and
    ``required`` flags are set up before the flags are parsed.
    """
    from absl import app, flags

    head = f"{command} (the same program as: python -m {module})"
    main_module = sys.modules["__main__"]
    spec = getattr(main_module, "__spec__", None)
    if spec is not None and spec.name in (module, f"{module}.__main__"):  # python -m module
        main_module.__doc__ = doc  # a package's __main__.py shows its program's docstring
    else:  # a console command
        main_module.__doc__ = f"{head}\n\n{doc or ''}"
    if define_flags is not None:
        define_flags()
    # absl's --help lists the key flags of the module named sys.argv[0] (the program's own file under
    # python -m, pip's wrapper here): make the program's flags key flags of that name.
    for flag in flags.FLAGS.get_flags_for_module(main.__module__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    if required:
        flags.mark_flags_as_required(list(required))
    app.run(main)
