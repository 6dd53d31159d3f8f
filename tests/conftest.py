"""Shared fixtures: small phantom scans generated once per test session."""

from __future__ import annotations

import pytest

from data_prep.phantom.generator import generate_scan, write_scan

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
