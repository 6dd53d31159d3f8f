"""Shared fixtures: small phantom scans generated once per test session; one JAX compilation cache per run,
and XLA compiling for speed of compilation (below).

The cache: most of a small training or scoring run on this CPU is XLA compiling the same few programs
(a 12-step training subprocess: 124 s cold, 40 s with the compiled programs on disk, measured beside
another training). So one test run keeps one persistent compilation cache, made here in the controlling
process before any test imports jax and inherited by the xdist workers and every subprocess a test starts
(they copy ``os.environ``), and removed when the run ends. Each run starts cold, so nothing compiled by
older code is ever reused; a ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used as it is and kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import xla_env

from data_prep.phantom.generator import generate_scan, write_scan  # numpy only: jax is not imported yet

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = None
if _CACHE_ENV not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="calcjax-test-xla-cache-")
    os.environ[_CACHE_ENV] = _OWN_CACHE

# XLA's CPU backend at LLVM optimisation level 0 in every test process (set here, before any backend
# starts, and inherited like the cache): the tests run tiny inputs through programs that take longer to
# compile than to run. Measured 2026-12-01 beside a training: a 6-step smoke training subprocess 71-80 s
# -> 37-39 s, data_prep.check_install (4 scans at 256 x 256 through the shipped model) 75 s -> 63 s. Since
# then the train step carries its own level (calcjax.core.compile_cache.CPU_COMPILER_OPTIONS, which this
# flag does not change) and a model's initial weights are one program, so the flag now acts on the
# forward passes and the tests' own programs: the three longest tests took 274 s at level 0 and 260 s at
# XLA's default (2026-12-07, alone, within this machine's drift), the scoring tests faster there and the
# study slower. Results move in the last float32 bits only (those losses agreed to 1e-7):
# the tests compare runs of one test run with each other, or with the reference outputs within their
# tolerance; the one test whose tolerance was measured at users' level runs there (test_torch_parity.py).
# A level given by the caller is kept.
if xla_env.OPT_LEVEL_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_env.FAST_COMPILE}".strip()


# The longest tests, measured with --durations (2026-12-07, `make test` beside other work): the study's
# tiny run ~480 s, the COCA recipe ~420 s, the 50-scan cohort ~250 s. Under pytest-xdist a long test that
# starts late keeps one worker busy after the other has run out of tests, so these start first, then the
# other slow tests, then the rest.
LONGEST_FIRST = ("test_repro.py", "test_coca_recipe.py", "test_cohort_scale.py")


def _start_rank(item) -> int:
    """0, 1, 2 for the slow tests of ``LONGEST_FIRST``'s files, 3 for the other slow tests, 4 for the rest."""
    slow = item.get_closest_marker("slow") is not None
    if slow and item.path.name in LONGEST_FIRST:
        return LONGEST_FIRST.index(item.path.name)
    return len(LONGEST_FIRST) + (not slow)


def pytest_collection_modifyitems(config, items):
    """The longest tests first, then the other slow ones, each group in collection order: xdist deals the
    first tests out to the workers in turn, so the three longest start at once on both workers."""
    items.sort(key=_start_rank)


def pytest_unconfigure(config):
    """Removes the run's compilation cache (only the one this conftest made, in the controlling process)."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


SMALL = 192  # matrix size for fast tests; geometry and HU follow the same code as 512


@pytest.fixture
def poison_first_param():
    """A function that sets one value of a model's first parameter array to NaN, in place (damaged
    weights, for the tests of what calcjax refuses)."""

    def poison(model):
        import jax
        import numpy as np
        from flax import nnx

        state = nnx.state(model, nnx.Param)
        leaves, treedef = jax.tree.flatten(state.to_pure_dict())
        leaves[0] = np.array(leaves[0])
        leaves[0].flat[0] = np.nan
        nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, leaves))
        nnx.update(model, state)
        return model

    return poison


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Two written phantom scans (cardiac with calcium, chest with calcium) at 192x192."""
    out = tmp_path_factory.mktemp("phantom")
    scans = {}
    for index, protocol, category in ((3, "cardiac", 3), (4, "chest", 4)):
        scan = generate_scan(7, index, protocol, size=SMALL, target_category=category)
        folder = write_scan(scan, str(out), seed=7, index=index)
        scans[protocol] = (scan, folder)
    return scans
