"""The heart's neighbourhood (calcjax.inference.heart_region): it keeps every reference calcium voxel and
drops bone, on phantoms and, where the real sample is at hand, on real gated and chest scans."""

from __future__ import annotations

import os

import numpy as np
import pytest

from calcjax.core.agatston import CALCIUM_THRESHOLD_HU
from calcjax.inference import heart_region as hr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("CALCJAX_REAL_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
COCA = os.path.join(REAL, "coca-sample")


@pytest.mark.parametrize("protocol", ["cardiac", "chest"])
def test_phantom_calcium_stays_in_the_region_and_bone_goes(phantom_dir, protocol):
    scan, _ = phantom_dir[protocol]
    region = hr.heart_region(scan.hu, scan.grid.spacing)
    assert region.found and region.status == "found"
    bright = scan.hu >= CALCIUM_THRESHOLD_HU
    calcium = (scan.label > 0) & bright
    assert calcium.sum() > 0
    assert (calcium & ~region.mask).sum() == 0  # not one reference voxel lost
    others = bright & ~calcium  # bone, confounders, noise specks
    assert (others & region.mask).sum() < 0.2 * others.sum(), (others & region.mask).sum() / others.sum()
    pred = np.where(bright, 4, 0).astype(np.uint8)  # a network that calls everything bright RCA
    kept = hr.restrict(pred, region)
    assert kept.dtype == np.uint8 and np.array_equal(kept > 0, bright & region.mask)


def test_the_lad_of_a_heart_against_the_chest_wall_stays_in():
    """A 512x512 chest phantom whose LAD lesion lies in thick fat about 27 mm in front of the lungs' hull:
    a 15 mm surface margin lost half its calcium voxels (SURFACE_MARGIN_MM's comment)."""
    from data_prep.phantom.generator import generate_scan

    scan = generate_scan(5, 1, "chest", size=512, target_category=2)
    calcium = (scan.label > 0) & (scan.hu >= CALCIUM_THRESHOLD_HU)
    region = hr.heart_region(scan.hu, scan.grid.spacing)
    assert calcium.sum() == 31 and (calcium & ~region.mask).sum() == 0


def test_a_scan_without_lungs_keeps_the_whole_grid():
    z, n = 6, 64
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    cylinder = np.where(yy**2 + xx**2 < (n / 2.5) ** 2, 40, -1000).astype(np.int16)
    hu = np.repeat(cylinder[None], z, axis=0)
    hu[3, 30:33, 30:33] = 400  # calcium in a water cylinder: no lung, so nothing may be removed
    region = hr.heart_region(hu, (3.0, 5.0, 5.0))
    assert not region.found and region.status == "not_found" and region.mask.all()
    with pytest.raises(ValueError, match="volume"):
        hr.heart_region(hu[0], (3.0, 5.0, 5.0))


@pytest.mark.skipif(not os.path.isdir(COCA), reason=f"no real sample at {COCA} (set CALCJAX_REAL_DATA)")
def test_real_scans_keep_every_reference_voxel_and_lose_almost_all_bone():
    from calcjax.data import scan_sources

    scans, errors = scan_sources.dicom_scans(COCA, context=1, salt="heart-region-test-salt")
    assert len(scans) == 5 and all(e["severity"] == "warning" for e in errors)  # invalid-UID warnings
    gated = chest = 0
    for scan in scans:
        loaded = scan.load()
        region = hr.heart_region(loaded.hu, loaded.grid.spacing)
        assert region.found
        bright = loaded.hu >= CALCIUM_THRESHOLD_HU
        kept = (bright & region.mask).sum() / bright.sum()
        assert kept < 0.03, (loaded.meta["protocol"], kept)  # measured 0.3-2.0%
        if loaded.meta["protocol"] == "cardiac":
            gated += 1
            calcium = (loaded.labels > 0) & bright
            assert calcium.sum() > 0 and (calcium & ~region.mask).sum() == 0
        else:
            chest += 1
            assert region.mask.mean() < 0.15  # the heart is a small part of a whole-thorax scan
    assert (gated, chest) == (3, 2)
