"""The persistent compilation cache: on by default under the user's cache folder, moved or turned off by
CALCJAX_COMPILE_CACHE, and a second process loads what the first compiled."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# enable() stores programs that take 0.5 s or more to compile; this tiny one is stored with the limit at 0.
PROGRAM = """
import jax, jax.numpy as jnp
from calcjax.core import compile_cache
print(compile_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.tanh(jnp.fft.fft2(x @ x.T)).real.sum()).lower(jnp.ones((64, 64))).compile()
"""


def _run(code: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _entries(folder: str) -> list[str]:
    return sorted(f for _, _, files in os.walk(folder) for f in files)


def _env(**values) -> dict:
    """This process's environment without the test run's JAX cache setting (conftest.py), plus ``values``."""
    dropped = ("JAX_COMPILATION_CACHE_DIR", "CALCJAX_COMPILE_CACHE")
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, **values}


def test_a_second_process_loads_the_first_ones_program(tmp_path):
    env = _env(CALCJAX_COMPILE_CACHE=str(tmp_path / "cache"))
    folder = _run(PROGRAM, env)
    assert folder.startswith(str(tmp_path / "cache") + os.sep)
    stored = _entries(folder)
    assert stored
    assert _run(PROGRAM, env) == folder and _entries(folder) == stored  # found, not compiled again


def test_off_turns_it_off_and_the_default_is_the_users_cache_folder(tmp_path):
    where = "from calcjax.core import compile_cache as c; print(c.folder())"
    assert _run(PROGRAM, _env(CALCJAX_COMPILE_CACHE="off")) == "None"
    assert _run(where, _env(XDG_CACHE_HOME=str(tmp_path / "xdg"))).startswith(
        str(tmp_path / "xdg" / "calcjax" / "xla") + os.sep
    )
    assert _run(where, _env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))) == str(tmp_path / "jax")
