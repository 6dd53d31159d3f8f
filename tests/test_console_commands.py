"""The console commands of pyproject.toml's [project.scripts]: installed beside the
Python that runs the tests, each one the same program as its ``python -m`` form, whose ``--help`` shows
the module's example command lines."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
COMMANDS = {
    "calcjax-score": ("calcjax.score", "--dicom DIR --out OUT"),
    "calcjax-train": ("calcjax.train", "--config configs/smoke.py --workdir RUN"),
    "calcjax-build": ("data_prep.build", "--input DIR --out SHARDS"),
    "calcjax-phantom": ("data_prep.phantom", "--out DIR --scans N"),
    "calcjax-compare": ("calcjax.research.compare", "RUN_JAX RUN_TORCH --out DIR"),
    "calcjax-check-install": ("data_prep.check_install", "--write"),
}


def test_pyproject_declares_exactly_these_commands():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)
    for command, target in scripts.items():
        module, function = target.split(":")
        assert function == "run"
        assert module.removesuffix(".__main__") == COMMANDS[command][0]


def _help(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*argv, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)


def _flag_lines(text: str) -> list[str]:
    """The help text without its program-path lines (``<file>:`` headings of absl's flag list)."""
    return [line for line in text.splitlines() if not line.rstrip().endswith((".py:", f"{os.sep}calcjax-"))]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_names_the_program_and_matches_its_python_m_form(command):
    path = os.path.join(BIN, command)
    assert os.access(path, os.X_OK), f"{path} is not installed: run make install (pip install -e .)"
    module, example = COMMANDS[command]
    got, want = _help([path]), _help([sys.executable, "-m", module])
    assert got.returncode == want.returncode, got.stderr  # absl's --help exits 1 in both forms
    head = f"{command} (the same program as: python -m {module})"
    assert got.stdout.startswith(head + "\n\n")
    assert f"python -m {module} " in got.stdout and example in got.stdout  # the module's example lines
    body = [line for line in _flag_lines(got.stdout[len(head) + 2 :]) if not line.endswith(f"{command}:")]
    assert body == [line for line in _flag_lines(want.stdout) if not line.endswith(".py:")]
    assert any(line.strip().startswith("--") for line in body)  # the program's flags are listed


def test_a_command_reports_a_bad_input_in_one_line(tmp_path):
    """The console command goes through the same error path as ``python -m``: exit 2, one line."""
    proc = subprocess.run(
        [os.path.join(BIN, "calcjax-score"), "--dicom", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("calcjax.score: error:") and "no CT series found" in proc.stderr
