"""Transparent huge pages for the temporaries of XLA's CPU programs (Linux, glibc 2.35 and later).

XLA's CPU runtime allocates each execution's temporaries as one block from the calling thread's malloc
arena; a block larger than such an arena can hold (64 MiB) is a fresh ``mmap`` every time, so each train
step touches it page by page again: the smoke config's step has a 227 MiB block, 58,000 page faults per
step on 4 KiB pages. glibc's ``glibc.malloc.hugetlb=1`` tunable has malloc ask for transparent huge pages
on the memory it maps (2 MiB pages: about 330 faults per step) where the kernel allows them
(``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``). On the 2-core development
CPU it took the smoke train step from 0.26 to 0.20 s (``bench/model.py`` measures PyTorch under the same
setting, which gains too).

glibc reads its tunables once, when a process starts, so :func:`reexec_with_huge_pages` (called first
by ``calcjax-train``) starts the program again with ``GLIBC_TUNABLES`` extended, before any work is done;
``CALCJAX_HUGE_PAGES=0`` turns it off. Elsewhere (another C library, no transparent huge pages, the
setting already there) it does nothing.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_ENV = "CALCJAX_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, int] | None:
    """This process's glibc version (major, minor), or None under another C library."""
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def kernel_allows_huge_pages(setting_path: str = THP_SETTING) -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks (``[always]`` or
    ``[madvise]`` selected in ``setting_path``)."""
    try:
        with open(setting_path) as f:
            setting = f.read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def tunables_with_huge_pages(current: str) -> str:
    """``GLIBC_TUNABLES`` with :data:`TUNABLE` added to ``current`` (colon-separated, kept as it is)."""
    return f"{current}:{TUNABLE}" if current else TUNABLE


def wanted(environ: Mapping[str, str], glibc: tuple[int, int] | None, kernel_allows: bool) -> bool:
    """Whether a process with ``environ``, under ``glibc`` (None: another C library), should start again
    with huge pages: not turned off, not already set, glibc new enough and the kernel willing."""
    if environ.get(OPT_OUT_ENV, "1") == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    return sys.platform.startswith("linux") and glibc is not None and glibc >= MIN_GLIBC and kernel_allows


def reexec_with_huge_pages() -> None:
    """Starts this program again (same interpreter, same command line) with huge pages for malloc's
    mapped memory, where :func:`wanted`; returns only where it is not. Call it before any work is done."""
    if not wanted(os.environ, glibc_version(), kernel_allows_huge_pages()):
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES", "")))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
