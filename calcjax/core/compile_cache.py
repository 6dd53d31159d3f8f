"""JAX's persistent compilation cache, on by default for training, scoring and the benches.

Every process used to compile its programs from scratch (the default train step: 19 s cold on a 2-core
CPU, 1.8 s from the cache; docs/benchmarks.md). With the cache, a second process with the same program,
shapes, jax version and machine loads the compiled executable instead.

Where: ``$CALCJAX_COMPILE_CACHE`` when set (a folder; ``off``, ``0`` or an empty string turn the cache
off), else JAX's own ``$JAX_COMPILATION_CACHE_DIR`` as it is, else ``$XDG_CACHE_HOME/calcjax/xla``
(``~/.cache/calcjax/xla``); calcjax's folders get a sub-folder per jax version and machine so that nodes
with other CPU features never load each other's executables. JAX writes each
entry atomically, so several processes (data-parallel hosts, a leave-one-out driver and its runs) may
share the folder. The cache is trusted code: keep it in a folder only you can write to.
"""

from __future__ import annotations

import hashlib
import os
import platform

ENV = "CALCJAX_COMPILE_CACHE"
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
OFF = ("off", "0", "")


def default_folder() -> str:
    """``$XDG_CACHE_HOME/calcjax/xla`` (or ``~/.cache/calcjax/xla``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "calcjax", "xla")


def folder() -> str | None:
    """The cache folder this process uses (module docstring), or None when the cache is off."""
    import jax

    chosen = os.environ.get(ENV)
    if chosen is not None and chosen.strip().lower() in OFF:
        return None
    if chosen is None and os.environ.get(JAX_ENV):
        return os.environ[JAX_ENV]  # the caller's own JAX setting, used as it is
    root = chosen or default_folder()
    return os.path.join(root, f"jax-{jax.__version__}-{platform.machine()}-{_cpu_features()}")


def _cpu_features() -> str:
    """A short hash of the CPU's model and feature flags (``/proc/cpuinfo``; "any" where there is none):
    executables compiled for one CPU may use instructions another lacks."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [x for x in f if x.startswith(("model name", "flags", "Features", "CPU part"))]
    except OSError:
        return "any"
    return hashlib.sha256("".join(sorted(set(lines))).encode()).hexdigest()[:12] if lines else "any"


def enable() -> str | None:
    """Turns the cache on (before the first compilation) and returns its folder, or None when off.
    Programs that compile in under 0.5 s are not stored (loading them would gain nothing)."""
    import jax

    path = folder()
    if path is None:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# LLVM optimisation level of XLA's CPU code generation for the train step. Measured on the 2-core
# development CPU (docs/benchmarks.md): level 1 compiles the default train step about 15% faster than
# XLA's default (2) at the same smoke step time; the convolutions, most of a step, are library calls that
# the level does not touch. It moves float rounding (weights after 3 smoke steps differ by up to 3e-5), so
# the scorer's forward keeps XLA's default and scores stay as they were. Other backends keep the defaults.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


# Programs a process runs once (a model's initial weights, a fresh train state): compiled at the lowest
# optimisation level on CPU, where compiling them is all their cost (calcjax.model.network.new_model).
ONE_OFF_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def one_off_options() -> dict | None:
    """``jax.jit(..., compiler_options=...)`` of a program run once per process on this backend."""
    return _on_cpu_only(ONE_OFF_CPU_OPTIONS)


def compiler_options() -> dict | None:
    """``jax.jit(..., compiler_options=...)`` of the train step on this process's backend."""
    return _on_cpu_only(CPU_COMPILER_OPTIONS)


def _on_cpu_only(options: dict) -> dict | None:
    """A copy of ``options`` on JAX's CPU backend; None (XLA's defaults) on any other."""
    import jax

    return dict(options) if jax.default_backend() == "cpu" else None
