"""Shared fixtures: small phantom scans generated once per test session; one JAX compilation cache per run.

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

from data_prep.phantom.generator import generate_scan, write_scan  # numpy only: jax is not imported yet

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = None
if _CACHE_ENV not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="calcjax-test-xla-cache-")
    os.environ[_CACHE_ENV] = _OWN_CACHE


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
