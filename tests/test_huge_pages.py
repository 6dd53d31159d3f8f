"""Huge pages for malloc's mapped memory (``calcjax.core.huge_pages``): when a program starts again with
glibc's tunable, and that it does, once, with its command line and environment kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from calcjax.core import huge_pages

NEW_GLIBC = (2, 36)


@pytest.mark.parametrize(
    "environ, glibc, kernel_allows, expected",
    [
        ({}, NEW_GLIBC, True, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, NEW_GLIBC, True, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, NEW_GLIBC, True, False),  # the user chose
        ({"GLIBC_TUNABLES": huge_pages.TUNABLE}, NEW_GLIBC, True, False),  # already started again
        ({huge_pages.OPT_OUT_ENV: "0"}, NEW_GLIBC, True, False),
        ({huge_pages.OPT_OUT_ENV: "1"}, NEW_GLIBC, True, True),
        ({}, (2, 31), True, False),  # glibc before the tunable
        ({}, None, True, False),  # another C library
        ({}, NEW_GLIBC, False, False),  # the kernel gives no transparent huge pages
    ],
)
def test_it_starts_again_only_where_the_setting_is_missing_and_would_work(
    environ, glibc, kernel_allows, expected
):
    assert huge_pages.wanted(environ, glibc, kernel_allows) is (expected and sys.platform.startswith("linux"))


def test_the_tunable_is_added_to_the_users_own():
    assert huge_pages.tunables_with_huge_pages("") == huge_pages.TUNABLE
    assert huge_pages.tunables_with_huge_pages("glibc.malloc.arena_max=2") == (
        "glibc.malloc.arena_max=2:" + huge_pages.TUNABLE
    )


@pytest.mark.parametrize(
    "setting, allows",
    [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ],
)
def test_the_kernels_setting_is_read(tmp_path, setting, allows):
    path = tmp_path / "enabled"
    path.write_text(setting)
    assert huge_pages.kernel_allows_huge_pages(str(path)) is allows
    assert huge_pages.kernel_allows_huge_pages(str(tmp_path / "missing")) is False


def _environ_without_the_setting() -> dict[str, str]:
    """This process's environment without ``GLIBC_TUNABLES`` and the opt-out."""
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT_ENV)}


def _starts_again_here() -> bool:
    """Whether a program started without the setting starts again on this machine."""
    return huge_pages.wanted({}, huge_pages.glibc_version(), huge_pages.kernel_allows_huge_pages())


PROBE = (
    "import os, sys; from calcjax.core import huge_pages; huge_pages.reexec_with_huge_pages(); "
    "print(os.environ.get('GLIBC_TUNABLES', ''), os.environ.get('PROBE_KEPT'), sys.argv[1:])"
)


def _probe(**env) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "a b", "--flag"],
        env={**_environ_without_the_setting(), "PROBE_KEPT": "yes", **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout.rstrip("\n")


def test_the_program_starts_again_once_with_its_arguments_and_environment():
    here = _starts_again_here()
    tunables = huge_pages.TUNABLE if here else ""
    assert _probe() == f"{tunables} yes ['a b', '--flag']"
    assert _probe(**{huge_pages.OPT_OUT_ENV: "0"}) == " yes ['a b', '--flag']"
    if not here:
        pytest.skip("this machine has no transparent huge pages or glibc before 2.35: nothing to start again")


def test_the_trainer_starts_again_before_it_imports_jax():
    """``python -m calcjax.train`` starts again before its heavy imports: across both processes
    (``-X importtime`` reports each process's imports) jax and the trainer are imported once."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "calcjax.train", "--help"],
        env=_environ_without_the_setting(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "--config" in result.stdout, result.stderr[-2000:]  # its help (absl's --help exits 1)
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    here = _starts_again_here()
    assert imported.count("calcjax.core.huge_pages") == (2 if here else 1)
    assert imported.count("jax") == 1 and imported.count("calcjax.train.loop") == 1
