"""Every command of the README runs as written: each ``python -m`` program and console command answers
``--help`` and knows every flag the README gives it (config overrides name keys of that config), each
``make`` target exists, and the first scoring command scores a phantom folder."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def readme_commands() -> list[str]:
    """The README's shell commands: ```bash blocks, continuation lines joined, comments dropped."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _program(words: list[str]) -> tuple[list[str], list[str]] | None:
    """(the argv that runs the program, its arguments) of a README command, None for a shell one."""
    if words[0] == ".venv/bin/python" and words[1] == "-m":
        return [sys.executable, "-m", words[2]], words[3:]
    if words[0].startswith(".venv/bin/calcjax-"):
        return [os.path.join(BIN, os.path.basename(words[0]))], words[1:]
    return None


PROGRAMS = [c for c in readme_commands() if _program(shlex.split(c))]
MAKE = [c for c in readme_commands() if c.startswith("make ")]


def test_the_readme_has_the_commands_a_newcomer_needs():
    assert "make install" in MAKE and any("calcjax.score --dicom" in c for c in PROGRAMS)
    assert any("calcjax.train" in c for c in PROGRAMS) and any("data_prep.build" in c for c in PROGRAMS)


@pytest.mark.parametrize("command", MAKE)
def test_make_targets_exist(command):
    target = shlex.split(command)[1]
    out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _config_key_exists(config_file: str, dotted: str) -> bool:
    module = importlib.import_module(config_file.removesuffix(".py").replace("/", "."))
    node = module.get_config()
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("command", PROGRAMS)
def test_readme_programs_know_their_flags(command):
    argv, args = _program(shlex.split(command))
    out = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode in (0, 1) and "Traceback" not in text, text[-2000:]
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if config is None and "--config" in args:
        config = args[args.index("--config") + 1]
    for arg in args:
        if not arg.startswith("--"):
            continue
        flag = arg[2:].split("=", 1)[0]
        if flag.startswith("config."):
            assert _config_key_exists(config, flag.removeprefix("config.")), f"{flag} is no key of {config}"
        else:
            plain = flag.removeprefix("no") if f"--{flag}" not in text else flag
            assert f"--{plain}" in text or f"--[no]{plain}" in text, f"{command}: --help names no --{flag}"


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory):
    from data_prep.phantom.generator import generate_scan, write_scan

    base = tmp_path_factory.mktemp("readme")
    write_scan(generate_scan(3, 0, "cardiac", size=64, target_category=2), str(base / "DIR"), seed=3, index=0)
    return base


def test_the_first_scoring_command_scores_a_phantom_folder(phantom_folder):
    (command,) = [c for c in PROGRAMS if "calcjax.score --dicom DIR --out OUT" in c][:1]
    argv, args = _program(shlex.split(command))
    out = subprocess.run([*argv, *args], cwd=phantom_folder, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(phantom_folder / "OUT" / "scores.csv") as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("scan_id") and len(rows) == 2
