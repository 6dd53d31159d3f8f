"""``XLA_FLAGS`` of the test run and of the subprocesses its tests start.

The run compiles at ``FAST_COMPILE`` (``conftest.py`` says why); a subprocess gets the run's flags with a
device count of the test's choosing instead of any the run was given, and, where a test checks float32
rounding against a tolerance measured at the level users compile at, ``USERS_LEVEL`` instead."""

from __future__ import annotations

import os

OPT_LEVEL_FLAG = "--xla_backend_optimization_level"
FAST_COMPILE = f"{OPT_LEVEL_FLAG}=0"
USERS_LEVEL = f"{OPT_LEVEL_FLAG}=3"  # XLA's default: what calcjax compiles at outside the tests
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def at_fast_compile() -> bool:
    """Whether this process compiles at ``FAST_COMPILE``."""
    return FAST_COMPILE in os.environ.get("XLA_FLAGS", "").split()


def xla_flags(devices: int | None = None, users_level: bool = False) -> str:
    """This run's ``XLA_FLAGS`` without any device count, plus ``devices`` CPU devices if given; with
    ``users_level``, at ``USERS_LEVEL`` instead of the run's optimisation level."""
    drop = (DEVICE_COUNT_FLAG,) + ((OPT_LEVEL_FLAG,) if users_level else ())
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(drop)]
    if devices is not None:
        flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
    if users_level:
        flags.append(USERS_LEVEL)
    return " ".join(flags)
