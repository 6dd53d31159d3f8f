"""``calcjax.io.reslice``: thick slices as overlap-weighted means of thin ones, their labels, their grid."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calcjax.io import reslice
from calcjax.io.geometry import Grid


def test_the_weights_of_3_mm_slices_in_5_mm_ones():
    w = reslice.slab_weights(5, 3.0, 5.0)  # 15 mm: three thick slices
    np.testing.assert_allclose(
        w, [[0.6, 0.4, 0, 0, 0], [0, 0.2, 0.6, 0.2, 0], [0, 0, 0, 0.4, 0.6]], atol=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    increment=st.sampled_from([0.5, 0.625, 1.0, 1.25, 2.5, 3.0]),
    thickness=st.sampled_from([3.0, 5.0, 7.5]),
)
def test_a_thick_slice_keeps_the_hu_of_what_it_covers(n, increment, thickness):
    if thickness < increment or n * increment < thickness:
        with pytest.raises(ValueError, match="mm"):
            reslice.slab_weights(n, increment, thickness)
        return
    w = reslice.slab_weights(n, increment, thickness)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-9)
    assert w.shape[0] == int(np.floor(n * increment / thickness + 1e-9))
    cover = w.sum(axis=0) * thickness  # mm of each thin slice that the thick ones take in
    covered = w.shape[0] * thickness
    full = int(np.floor(covered / increment + 1e-9))  # thin slices wholly inside the covered extent
    np.testing.assert_allclose(cover[:full], increment)
    assert (cover <= increment + 1e-9).all() and cover.sum() == pytest.approx(covered)
    hu = np.random.default_rng(n).normal(0, 300, (n, 2, 2))
    constant = np.tensordot(w, np.ones((n, 2, 2)) * 77.0, axes=1)  # a z-constant scan stays constant
    np.testing.assert_allclose(constant, 77.0)
    assert np.tensordot(w, hu, axes=1).shape == (w.shape[0], 2, 2)


def _grid(n, dz=3.0):
    return Grid(shape=(n, 8, 8), spacing=(dz, 0.5, 0.5), origin=(10.0, -20.0, 100.0))


def test_labels_follow_the_thick_hu_and_the_artery_covering_most():
    hu = np.full((5, 8, 8), 40.0, np.float32)
    lab = np.zeros((5, 8, 8), np.uint8)
    hu[0:2, 1, 1], lab[0, 1, 1], lab[1, 1, 1] = 600.0, 2, 4  # slab 0: LAD covers 0.6, RCA 0.4 -> LAD
    hu[1, 2, 2], lab[1, 2, 2] = 300.0, 3  # 0.4 * 300 + 0.6 * 40 = 144 in slab 0: kept
    hu[3, 3, 3], lab[3, 3, 3] = 300.0, 1  # slab 1 sees 0.2 of it: 88 HU, gone; slab 2: 0.4 -> 144, kept
    hu[:, 5, 5] = 900.0  # bright and unlabelled (bone): background
    out = reslice.thick_slices(hu, lab, _grid(5), 5.0)
    assert out.hu.shape == (3, 8, 8) and out.labels.shape == (3, 8, 8)
    assert out.labels[0, 1, 1] == 2 and out.labels[0, 2, 2] == 3
    assert out.labels[1, 3, 3] == 0 and out.labels[2, 3, 3] == 1
    assert not out.labels[:, 5, 5].any()
    assert out.hu[1, 3, 3] == pytest.approx(0.2 * 300 + 0.8 * 40)


def test_the_grid_moves_its_origin_to_the_first_thick_centre():
    grid = Grid(shape=(10, 8, 8), spacing=(3.0, 0.5, 0.5), origin=(0.0, 0.0, 50.0),
                row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 0.0, -1.0))  # fmt: skip  # a coronal-ish normal
    out = reslice.thick_slices(np.zeros((10, 8, 8), np.int16), None, grid, 5.0)
    assert out.labels is None and out.grid.shape == (6, 8, 8)
    assert out.grid.spacing == (5.0, 0.5, 0.5)
    np.testing.assert_allclose(out.grid.origin, np.asarray(grid.origin) + grid.normal * 1.0)  # 2.5 - 1.5


def test_slices_thinner_than_the_increment_are_refused():
    with pytest.raises(ValueError, match="increment in \\(0, 2.0\\] mm, got 3.0 mm"):
        reslice.thick_slices(np.zeros((4, 8, 8)), None, _grid(4), 2.0)
