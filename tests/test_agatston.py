"""Known-answer tests of calcjax.core.agatston (hand-computed values)."""

from __future__ import annotations

import numpy as np
import pytest
from agatston_reference import independent_agatston
from scipy import ndimage

from calcjax.core import agatston


def volume(nz=3, n=20, fill=-50.0):
    return np.full((nz, n, n), fill, np.float32), np.zeros((nz, n, n), np.uint8)


@pytest.mark.parametrize(
    ("peak", "weight"),
    [(130, 1), (199, 1), (200, 2), (299, 2), (300, 3), (399, 3), (400, 4), (1500, 4)],
)
def test_single_lesion_in_each_weight_band(peak, weight):
    hu, lab = volume()
    hu[1, 5:8, 5:9] = 130.0  # 12 pixels at the threshold
    hu[1, 6, 6] = peak
    lab[1, 5:8, 5:9] = 2
    r = agatston.score(hu, lab, (3.0, 0.5, 0.5))
    area = 12 * 0.25
    assert r["agatston"] == pytest.approx(area * weight)
    assert r["agatston_per_artery"]["LAD"] == pytest.approx(area * weight)
    assert r["volume_mm3"] == pytest.approx(12 * 0.75)
    assert (
        r["num_lesions"] == 1 and r["lesions"][0]["weight"] == weight and r["lesions"][0]["peak_hu"] == peak
    )


def test_voxels_below_threshold_or_unlabelled_do_not_count():
    hu, lab = volume()
    hu[1, 5:8, 5:9] = 129.0
    lab[1, 5:8, 5:9] = 1
    hu[1, 12:16, 12:16] = 500.0  # bright but unlabelled (bone, aorta)
    r = agatston.score(hu, lab, (3.0, 0.5, 0.5))
    assert r["agatston"] == 0 and r["risk_category"] == 0 and r["lesions"] == []


def test_lesion_just_under_one_square_millimetre_does_not_count():
    hu, lab = volume()
    hu[1, 5, 5:8] = 450.0  # 3 pixels x 0.25 mm^2 = 0.75 mm^2
    lab[1, 5, 5:8] = 3
    hu[1, 10, 5:9] = 450.0  # 4 pixels = 1.00 mm^2: counts (>=)
    lab[1, 10, 5:9] = 3
    r = agatston.score(hu, lab, (3.0, 0.5, 0.5))
    assert r["agatston"] == pytest.approx(1.0 * 4)
    assert [les["counted"] for les in sorted(r["lesions"], key=lambda x: x["area_mm2"])] == [False, True]
    assert r["volume_mm3"] == pytest.approx(4 * 0.75)


def test_two_lesions_on_one_slice_of_different_arteries():
    hu, lab = volume(nz=1)
    hu[0, 2:4, 2:6] = 250.0  # 8 px LAD, weight 2
    lab[0, 2:4, 2:6] = 2
    hu[0, 10:13, 10:13] = 350.0  # 9 px RCA, weight 3
    lab[0, 10:13, 10:13] = 4
    r = agatston.score(hu, lab, (3.0, 1.0, 1.0))
    assert r["agatston_per_artery"] == {"LM": 0.0, "LAD": 16.0, "LCX": 0.0, "RCA": 27.0}
    assert r["agatston"] == 43.0 and r["num_lesions"] == 2 and r["risk_category"] == 2


def test_eight_connectivity_and_majority_artery():
    hu, lab = volume(nz=1)
    # Diagonal neighbours join one lesion (8-connected); 3 LAD voxels and 2 LCX voxels -> LAD.
    for i, label in enumerate([2, 2, 3, 2, 3]):
        hu[0, 3 + i, 3 + i] = 220.0
        lab[0, 3 + i, 3 + i] = label
    r = agatston.score(hu, lab, (3.0, 1.0, 1.0))
    assert r["num_lesions"] == 1 and r["lesions"][0]["artery"] == "LAD"
    assert r["agatston_per_artery"]["LAD"] == 10.0 and r["agatston_per_artery"]["LCX"] == 0.0
    # A tie goes to the lower label.
    lab[0, 7, 7] = 0
    hu[0, 7, 7] = -50
    lab[0, 3, 3] = 3
    r = agatston.score(hu, lab, (3.0, 1.0, 1.0))
    assert r["lesions"][0]["artery"] == "LAD"  # 2 LAD (labels 2) vs 2 LCX -> LAD


@pytest.mark.parametrize(
    ("increment", "slices", "expected"), [(1.5, 4, 10 * 2 * 4 * 0.5), (5.0, 1, 10 * 2 * 5 / 3)]
)
def test_slice_increment_normalisation(increment, slices, expected):
    hu, lab = volume(nz=6)
    hu[1 : 1 + slices, 4:6, 4:9] = 250.0  # 10 px x 1 mm^2, weight 2, on `slices` slices
    lab[1 : 1 + slices, 4:6, 4:9] = 2
    r = agatston.score(hu, lab, (increment, 1.0, 1.0))
    assert r["agatston"] == pytest.approx(expected)
    assert r["volume_mm3"] == pytest.approx(10 * slices * increment)


def qrm_insert(dxy=0.05, dz=0.1):
    """QRM-like insert: cylinders (axis z) of diameter = length 5, 3, 1 mm at 200, 400, 800 HU."""
    cylinders = [(5.0, 200.0, 1), (3.0, 400.0, 2), (1.0, 800.0, 3)]
    n, nz = int(24 / dxy), int(6 / dz)
    hu = np.full((nz, n, n), 0.0, np.float32)
    lab = np.zeros((nz, n, n), np.uint8)
    yy, xx = (np.mgrid[:n, :n] + 0.5) * dxy
    zc = (np.arange(nz) + 0.5) * dz
    for i, (d, density, label) in enumerate(cylinders):
        disc = (yy - 12.0) ** 2 + (xx - (4.0 + 8.0 * i)) ** 2 <= (d / 2) ** 2
        in_z = np.abs(zc - 3.0) <= d / 2
        hu[in_z[:, None, None] & disc[None]] = density
        lab[in_z[:, None, None] & disc[None]] = label
    return hu, lab, (dz, dxy, dxy)


def test_qrm_like_insert_volumes_areas_and_mass_are_analytic():
    hu, lab, spacing = qrm_insert()
    r = agatston.score(hu, lab, spacing, mass_calibration=1e-3)  # HU = mg HA/cm^3 -> mg/mm^3
    vol5, vol3 = np.pi * 2.5**2 * 5, np.pi * 1.5**2 * 3  # 98.2 and 21.2 mm^3
    assert r["volume_per_artery"]["LM"] == pytest.approx(vol5, rel=0.01)
    assert r["volume_per_artery"]["LAD"] == pytest.approx(vol3, rel=0.01)
    assert r["volume_per_artery"]["LCX"] == 0.0  # 1 mm cylinder: 0.785 mm^2 < 1 mm^2
    areas = {les["artery"]: les["area_mm2"] for les in r["lesions"]}
    assert areas["LM"] == pytest.approx(19.635, rel=0.01) and areas["LAD"] == pytest.approx(7.069, rel=0.01)
    assert areas["LCX"] == pytest.approx(0.785, rel=0.02)
    # Agatston = weight x volume / 3 mm for cylinders along z.
    assert r["agatston_per_artery"]["LM"] == pytest.approx(2 * vol5 / 3, rel=0.01)
    assert r["agatston_per_artery"]["LAD"] == pytest.approx(4 * vol3 / 3, rel=0.01)
    assert r["mass_per_artery"]["LM"] == pytest.approx(0.2 * vol5, rel=0.01)  # 200 mg/cm^3 x volume
    assert r["mass_per_artery"]["LAD"] == pytest.approx(0.4 * vol3, rel=0.01)
    assert r["mass_mg"] == pytest.approx(0.2 * vol5 + 0.4 * vol3, rel=0.01)


def test_mass_is_reported_only_with_a_calibration_factor():
    hu, lab, spacing = qrm_insert(dxy=0.1, dz=0.2)
    assert agatston.score(hu, lab, spacing)["mass_mg"] is None


@pytest.mark.parametrize(
    ("total", "category"), [(0, 0), (0.1, 1), (10, 1), (10.01, 2), (100, 2), (100.5, 3), (400, 3), (400.1, 4)]
)
def test_risk_category_bounds(total, category):
    assert agatston.risk_category(total) == category


def test_kvp_specific_threshold():
    hu, lab = volume()
    hu[1, 5:9, 5:9] = 140.0
    lab[1, 5:9, 5:9] = 1
    assert agatston.score(hu, lab, (3, 0.5, 0.5), kvp=100)["agatston"] == 4.0  # fixed 130 HU threshold
    assert agatston.score(hu, lab, (3, 0.5, 0.5), kvp=100, kvp_specific_threshold=True)["agatston"] == 0.0
    with pytest.raises(ValueError, match="no kVp-specific"):
        agatston.score(hu, lab, (3, 0.5, 0.5), kvp=90, kvp_specific_threshold=True)


def test_empty_volumes_and_bad_input():
    hu, lab = volume()
    r = agatston.score(hu, lab, (3, 0.5, 0.5))
    assert r["agatston"] == 0 and r["risk_category_name"].startswith("0")
    r = agatston.score(np.zeros((0, 4, 4)), np.zeros((0, 4, 4), np.uint8), (3, 0.5, 0.5))
    assert r["agatston"] == 0
    hu[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        agatston.score(hu, lab, (3, 0.5, 0.5))
    hu[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        agatston.score(hu, lab, (3, 0.5, 0.5))
    with pytest.raises(ValueError, match="must be equal"):
        agatston.score(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), (3, 0.5, 0.5))
    with pytest.raises(ValueError, match="labels must lie"):
        agatston.score(np.zeros((2, 4, 4)), np.full((2, 4, 4), 7), (3, 0.5, 0.5))
    with pytest.raises(ValueError, match="spacing"):
        agatston.score(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), (0, 0.5, 0.5))


def _check_against_naive(hu, lab, spacing):
    total, per, volume, lesions = independent_agatston(hu, lab, spacing)
    r = agatston.score(hu, lab, spacing)
    assert r["agatston"] == pytest.approx(total, rel=1e-9, abs=1e-9)
    assert [r["agatston_per_artery"][a] for a in agatston.ARTERIES] == pytest.approx(per, rel=1e-9, abs=1e-9)
    assert r["volume_mm3"] == pytest.approx(volume, rel=1e-9, abs=1e-9)
    assert r["num_lesions"] == lesions


def test_lesion_labelling_equals_scipy_on_random_volumes():
    """Randomized equivalence of the in-plane labelling: random speckle and blobs,
    where 8-connectivity, diagonal touches, artery ties and the 1 mm^2 limit all occur."""
    rng = np.random.default_rng(6)
    for trial in range(60):
        shape = (int(rng.integers(1, 5)), int(rng.integers(5, 30)), int(rng.integers(5, 30)))
        hu = rng.uniform(-200, 900, shape).astype(np.float32)
        if trial % 2:
            hu = ndimage.gaussian_filter(hu, 1.0) * 3.0
        lab = (rng.uniform(size=shape) < rng.uniform(0.2, 0.9)) * rng.integers(1, 5, shape)
        spacing = (
            float(rng.choice([0.5, 1.5, 3.0])),
            float(rng.uniform(0.3, 0.8)),
            float(rng.uniform(0.3, 0.8)),
        )
        _check_against_naive(hu, lab.astype(np.uint8), spacing)


def test_grow_to_threshold_grows_labels_into_the_lesions_130_hu_edge_and_no_further():
    """grow_to_threshold (data.label_grow_px, the lesion probe's growth lines): a label grows through
    adjacent >= 130 HU voxels by at most ``steps`` 4-connected steps, loses its voxels under 130 HU and
    leaves other bright voxels alone; where two arteries' labels meet, the higher label takes the voxel."""
    yy, xx = np.mgrid[:40, :40]
    hu = np.full((40, 40), 40.0)
    hu[10:21, 10:21] = 200.0  # a halo 4-5 px wide around the core
    hu[14:17, 15:18] = 800.0  # the core
    hu[30:35, 30:35] = 600.0  # a separate bright object, unlabelled
    label = np.zeros((40, 40), np.uint8)
    label[14:17, 15:18] = 2
    label[15, 22] = 2  # a labelled voxel under 130 HU (outside the halo)
    out = agatston.grow_to_threshold(label, hu, 3)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 2}
    seeds = np.argwhere(label[:, :20])  # the core's labelled voxels (not the one under 130 HU)
    steps = np.min([np.abs(yy - y) + np.abs(xx - x) for y, x in seeds], axis=0)
    np.testing.assert_array_equal(out > 0, (steps <= 3) & (hu >= 130))
    assert out[15, 22] == 0 and not out[30:35, 30:35].any()
    # Unlimited growth fills the lesion's connected >= 130 HU region, and only it.
    region = np.zeros((40, 40), bool)
    region[10:21, 10:21] = True
    np.testing.assert_array_equal(agatston.grow_to_threshold(label, hu, 50) > 0, region)
    # Two arteries meeting in one halo: each grows, the higher label wins where both arrive at once.
    two = np.zeros((40, 40), np.uint8)
    two[15, 12], two[15, 18] = 1, 3
    met = agatston.grow_to_threshold(two, hu, 3)
    assert met[15, 15] == 3 and met[15, 13] == 1 and met[15, 17] == 3
    np.testing.assert_array_equal(agatston.grow_to_threshold(label, hu, 0), np.where(hu >= 130, label, 0))
    # A volume grows in-plane only: the slice above a labelled one stays as it was.
    vol_hu, vol_label = np.stack([hu, hu]), np.stack([label, np.zeros_like(label)])
    grown = agatston.grow_to_threshold(vol_label, vol_hu, 3)
    np.testing.assert_array_equal(grown[0], out)
    assert not grown[1].any()
