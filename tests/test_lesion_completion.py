"""calcjax.inference.lesion_completion: a predicted lesion becomes its whole >= 130 HU footprint (hand-made
scans)."""

from __future__ import annotations

import numpy as np
import pytest

from calcjax.core import agatston
from calcjax.inference.lesion_completion import complete_lesions

SPACING = (3.0, 0.5, 0.5)  # (dz, dy, dx) mm: a pixel is 0.25 mm^2


def scan(nz=2, n=16):
    """Soft tissue (40 HU) with no calcium and no prediction."""
    return np.full((nz, n, n), 40.0, np.float32), np.zeros((nz, n, n), np.uint8)


def test_a_touched_component_is_completed_and_an_untouched_one_is_left():
    hu, pred = scan()
    hu[0, 2:5, 2:5] = 300.0  # 9 px = 2.25 mm^2, its core predicted
    hu[0, 3, 3] = 700.0
    pred[0, 3, 3] = 2
    hu[0, 10:12, 10:12] = 300.0  # a second component nobody marked
    out = complete_lesions(pred, hu, SPACING, max_area_mm2=10.0)
    expected = np.zeros_like(pred)
    expected[0, 2:5, 2:5] = 2
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == pred.dtype
    # the Agatston score is the whole lesion's, not its core's: 2.25 mm^2 x weight 4 (peak 700 HU)
    assert agatston.score(hu, out, SPACING)["agatston"] == pytest.approx(2.25 * 4)
    assert agatston.score(hu, pred, SPACING)["agatston"] == 0.0  # the core alone is under 1 mm^2


def test_components_are_eight_connected_within_a_slice_and_never_across_slices():
    hu, pred = scan()
    hu[0, 4, 4] = hu[0, 5, 5] = hu[0, 6, 6] = 250.0  # a diagonal chain: one 8-connected lesion
    hu[1, 4, 4] = 250.0  # the same place one slice on: another lesion
    pred[0, 4, 4] = 4
    out = complete_lesions(pred, hu, SPACING, max_area_mm2=10.0)
    assert out[0, 5, 5] == out[0, 6, 6] == 4
    assert out[1, 4, 4] == 0


def test_a_component_above_the_cap_is_left_as_predicted():
    hu, pred = scan()
    hu[0, 1:9, 1:9] = 500.0  # 64 px = 16 mm^2
    pred[0, 4, 4] = 1
    np.testing.assert_array_equal(complete_lesions(pred, hu, SPACING, max_area_mm2=15.0), pred)
    assert (complete_lesions(pred, hu, SPACING, max_area_mm2=16.0)[0, 1:9, 1:9] == 1).all()
    # the area is in mm^2: at 1 mm pixels the same 64 px are 64 mm^2
    np.testing.assert_array_equal(complete_lesions(pred, hu, (3.0, 1.0, 1.0), max_area_mm2=16.0), pred)


def test_the_majority_artery_labels_the_whole_lesion_and_a_tie_goes_to_the_lower_label():
    hu, pred = scan()
    hu[0, 2:6, 2:6] = 400.0
    pred[0, 2, 2:4] = 4  # two RCA votes
    pred[0, 5, 5] = 2  # one LAD vote
    assert set(np.unique(complete_lesions(pred, hu, SPACING, 10.0)[0, 2:6, 2:6])) == {4}
    pred[0, 4, 4] = 2  # two against two
    assert set(np.unique(complete_lesions(pred, hu, SPACING, 10.0)[0, 2:6, 2:6])) == {2}


def test_cap_zero_is_off_and_predictions_below_the_threshold_are_kept():
    hu, pred = scan()
    hu[0, 2:5, 2:5] = 300.0
    pred[0, 3, 3] = 3
    pred[1, 8, 8] = 1  # predicted on 40 HU: not a candidate, left for the scorer to ignore
    assert complete_lesions(pred, hu, SPACING, max_area_mm2=0.0) is pred
    out = complete_lesions(pred, hu, SPACING, max_area_mm2=10.0)
    assert out[1, 8, 8] == 1
    assert (out[0, 2:5, 2:5] == 3).all()
    # a threshold of another kVp makes other components: at 350 HU nothing here is a candidate
    np.testing.assert_array_equal(complete_lesions(pred, hu, SPACING, 10.0, threshold_hu=350.0), pred)


def test_mismatched_grids_are_refused():
    hu, pred = scan()
    with pytest.raises(ValueError, match="equal"):
        complete_lesions(pred[:, :8], hu, SPACING, 10.0)
