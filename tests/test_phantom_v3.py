"""Phantom v3: anatomy that fills the field of view, coronaries in fat grooves, confounders."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from data_prep.phantom import anatomy_v3, calcium, confounders_v3, tissue
from data_prep.phantom.acquisition import sample_acquisition
from data_prep.phantom.anatomy import aorta_centerline, coronary_centerlines, sample_patient
from data_prep.phantom.generator import generate_scan

KINDS_V3 = {"rib_end", "costal_cartilage", "lymph_node", "sternal_wire", "pacemaker_lead"}


@pytest.fixture(scope="module")
def every_confounder_scan():
    """A small gated v3 scan with every v3 confounder switched on."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WIRE_PROBABILITY", "LEAD_PROBABILITY", "NODE_PROBABILITY", "CARTILAGE_PROBABILITY"):
            mp.setattr(confounders_v3, name, 1.0)
        return generate_scan(5, 2, "cardiac", size=160, target_category=2, version=3)


def test_v3_confounders_are_bright_unlabelled_and_metal_reaches_its_peak(every_confounder_scan):
    scan = every_confounder_scan
    assert scan.truth["phantom_version"] == 3 and scan.truth["reference"]["risk_category"] == 2
    rows = scan.truth["confounders"]
    assert KINDS_V3 <= {r["kind"] for r in rows}
    for kind in KINDS_V3:
        peaks = [r["peak_noise_free_hu"] for r in rows if r["kind"] == kind]
        assert np.median(peaks) >= 250.0, kind
    # Metal reaches its 3000 HU peak however thin (its density is not capped at calcium's 3000 HU).
    for kind in ("sternal_wire", "pacemaker_lead"):
        assert np.median([r["peak_noise_free_hu"] for r in rows if r["kind"] == kind]) >= 2900.0, kind
    # Nothing of theirs is labelled: a confounder centre carries a label only where a lesion is within
    # 3 voxels (e.g. a node beside the LM).
    lesions = np.array([r["centre_index_zyx"] for r in scan.truth["lesions"]])
    for r in (r for r in rows if r["kind"] in KINDS_V3):
        idx = np.round(scan.grid.lps_to_index(np.asarray(r["centre_mm"]))).astype(int)
        inside = np.all(idx >= 0) and np.all(idx < scan.label.shape)
        if inside and scan.label[tuple(idx)]:
            assert np.abs(lesions - idx).max(axis=1).min() <= 3, r["kind"]


def test_v3_coronaries_run_in_fat_grooves_and_v4_in_a_thin_sleeve():
    """4 mm from a coronary wall v3 reads fat (its 5-8 mm groove); v1 (a 3 mm fat sleeve) and v4 (0.5-2.5
    mm) read the myocardium or the vessel's other surroundings there about half the time."""
    fat_share = {}
    for version in (1, 3, 4):
        rng = np.random.default_rng(7)
        acq = sample_acquisition("cardiac", rng, 192)
        patient = sample_patient(rng)
        if version >= 3:
            patient = anatomy_v3.enlarge(patient, rng, version=version)
        cor = list(coronary_centerlines(patient).values())
        hu = tissue.render_tissue(acq, patient, cor, aorta_centerline(patient, acq.slice_z()[0]), rng)
        d_cor = tissue.tube_distance(tissue.AxialGrid.from_acquisition(acq), cor, reach_mm=6.0)
        fat_share[version] = np.mean(hu[(d_cor > 3.5) & (d_cor < 4.5)] < -50.0)
    # measured: v1 0.55, v3 1.00, v4 0.37
    assert fat_share[3] > 0.9 and fat_share[1] < 0.7 and fat_share[4] < 0.7, fat_share


def test_v4_is_its_v3_twin_but_for_the_fat_around_the_coronaries():
    v3 = generate_scan(5, 2, "cardiac", size=128, target_category=2, version=3)
    v4 = generate_scan(5, 2, "cardiac", size=128, target_category=2, version=4)
    assert v4.truth["phantom_version"] == 4 and v4.truth["acquisition"] == v3.truth["acquisition"]
    changed = v3.hu != v4.hu
    assert 0 < changed.mean() < 0.05, changed.mean()

    # What changed was fat in v3 (the sleeve beyond 0.5-2.5 mm; noisy, so its edges leave the fat range)
    # and is what lies under the sleeve in v4: myocardium, blood, or lung where v3's groove reached past
    # the heart (measured: 79% fat in v3, 11% in v4). The calcium is the same.
    def fat_share(hu):
        return np.mean((hu > -190) & (hu < -30))

    assert fat_share(v3.hu[changed]) > 0.7 and fat_share(v4.hu[changed]) < 0.2
    assert v4.truth["reference"]["agatston"] == pytest.approx(v3.truth["reference"]["agatston"], rel=0.05)
    # The sleeve's range as an option: v3 drawn over v4's range is v4, byte for byte.
    assert 0.5 <= v4.truth["groove_fat_mm"] <= 2.5 and 5.0 <= v3.truth["groove_fat_mm"] <= 8.0
    same = generate_scan(5, 2, "cardiac", size=128, target_category=2, version=3, groove_fat_mm=(0.5, 2.5))
    assert np.array_equal(same.hu, v4.hu) and same.truth["groove_fat_mm"] == v4.truth["groove_fat_mm"]
    with pytest.raises(ValueError, match="groove_fat_mm"):
        generate_scan(5, 2, "cardiac", size=64, version=2, groove_fat_mm=(1.0, 2.0))


def test_gated_caudal_mm_extends_a_gated_scan_below_with_the_same_top_and_anatomy():
    base = generate_scan(5, 2, "cardiac", size=96, target_category=2, version=4)
    kw = dict(size=96, target_category=2, version=4)
    longer = generate_scan(5, 2, "cardiac", gated_caudal_mm=(20.0, 20.0), **kw)
    extra = longer.hu.shape[0] - base.hu.shape[0]
    assert extra == 6 and longer.truth["gated_caudal_mm"] == 20.0  # floor(20 mm / 3 mm) slices
    assert longer.grid.origin[2] == pytest.approx(base.grid.origin[2] - 18.0)  # bottom slice z, 18 mm lower
    top = base.acquisition.z_top_mm
    assert longer.acquisition.z_top_mm == top and longer.hu.shape[1:] == base.hu.shape[1:]
    # The added slices are below the heart: soft tissue (liver) fills the body, no calcium is labelled.
    below = longer.hu[:extra]
    body = below > -500
    assert longer.label[:extra].max() == 0 and 30 < np.median(below[body]) < 80, np.median(below[body])
    assert longer.truth["reference"]["risk_category"] == 2
    # (0, 0) draws a length of 0: the scan without the option, byte for byte; chest scans ignore it.
    zero = generate_scan(5, 2, "cardiac", gated_caudal_mm=(0.0, 0.0), **kw)
    assert np.array_equal(zero.hu, base.hu)
    chest = generate_scan(5, 3, "chest", size=48, target_category=0, version=4, gated_caudal_mm=(20.0, 20.0))
    assert "gated_caudal_mm" not in chest.truth
    with pytest.raises(ValueError, match="gated_caudal_mm"):
        generate_scan(5, 2, "cardiac", size=48, version=4, gated_caudal_mm=(10.0, 5.0))


def test_plaque_peak_max_hu_raises_only_the_top_bands_plaques_with_the_same_draws():
    kw = dict(size=96, target_category=3, version=4)
    base = generate_scan(5, 4, "cardiac", **kw)
    bright = generate_scan(5, 4, "cardiac", plaque_peak_max_hu=1500.0, **kw)
    assert bright.truth["plaque_peak_max_hu"] == 1500.0 and "plaque_peak_max_hu" not in base.truth
    b, h = base.truth["lesions"], bright.truth["lesions"]
    assert [(x["artery"], x["centre_mm"]) for x in b] == [(x["artery"], x["centre_mm"]) for x in h]
    low, top = calcium.WEIGHT_BANDS_HU[-1]
    mapped = 0
    for x, y in zip(b, h, strict=True):
        if x["target_peak_hu"] < 0.8 * low:  # below the top band and below any cluster neighbour of it
            assert y["target_peak_hu"] == x["target_peak_hu"]
        elif low <= x["target_peak_hu"] <= top:
            u = (x["target_peak_hu"] - low) / (top - low)  # the same uniform draw, a wider band
            mapped += y["target_peak_hu"] == pytest.approx(low + u * (1500.0 - low), abs=0.1)
    assert mapped >= 1  # this scan has a top-band plaque (the LAD one: 558 -> 722 HU)
    assert bright.truth["reference"]["risk_category"] == 3
    assert np.array_equal(generate_scan(5, 4, "cardiac", plaque_peak_max_hu=900.0, **kw).hu, base.hu)
    for bad in (400.0, 4000.0):
        with pytest.raises(ValueError, match="top band maximum"):
            generate_scan(5, 4, "cardiac", plaque_peak_max_hu=bad, **kw)


def test_bulky_plaque_adds_one_dense_plaque_wider_than_its_vessel_from_its_own_stream():
    kw = dict(size=96, target_category=3, version=3)
    base = generate_scan(1, 3, "cardiac", **kw)
    bulky = generate_scan(1, 3, "cardiac", bulky_plaque_probability=1.0, **kw)
    b, k = base.truth["lesions"], bulky.truth["lesions"]
    assert bulky.truth["bulky_plaques"] == 1 and len(k) == len(b) + 1
    # The other plaques are the same draws (the category search may rescale them, never move them).
    assert [(x["artery"], x["centre_mm"]) for x in b] == [(x["artery"], x["centre_mm"]) for x in k[:-1]]
    extra = k[-1]
    low, high = calcium.BULKY_PEAK_HU
    assert low - 1 <= extra["target_peak_hu"] <= high + 1 and extra["num_voxels"] > 0
    assert calcium.BULKY_WIDTH_MM[0] <= extra["size_mm"][1] <= calcium.BULKY_WIDTH_MM[1]
    assert (bulky.label == extra["label"]).sum() >= extra["num_voxels"]
    # Probability 0 draws nothing into the scan; a scan without calcium gets no bulky plaque.
    assert np.array_equal(generate_scan(1, 3, "cardiac", bulky_plaque_probability=0.0, **kw).hu, base.hu)
    none = generate_scan(1, 0, "cardiac", size=96, target_category=0, version=3, bulky_plaque_probability=1.0)
    assert none.truth["bulky_plaques"] == 0 and none.truth["reference"]["agatston"] == 0.0
    with pytest.raises(ValueError, match="bulky_plaque_probability"):
        generate_scan(1, 3, "cardiac", bulky_plaque_probability=1.5, **kw)


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ("--plaque_peak_max_hu=100", "top band maximum"),
        ("--gated_caudal_mm=10,5", "gated_caudal_mm"),
        ("--bulky_plaque_probability=-0.1", "bulky_plaque_probability"),
    ],
)
def test_the_phantom_command_refuses_a_bad_option_in_one_line_before_writing(tmp_path, flag, words):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.phantom", f"--out={out}", "--scans=1", "--size=48", flag]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not out.exists()


def test_v3_chest_body_fills_the_fov_and_lung_vessels_stay_in_the_lungs():
    """The v3 chest FOV is the body's width plus 5-40 mm (a real chest FOV is set to the body)."""
    scan = generate_scan(3, 1, "chest", size=128, target_category=0, version=3)
    mid = scan.hu[scan.hu.shape[0] // 2]
    width_mm = (mid > -900.0).sum(axis=1).max() * scan.grid.spacing[2]
    margin_mm = scan.truth["acquisition"]["fov_mm"] - width_mm
    assert 5.0 - 6.0 < margin_mm < 40.0 + 6.0, margin_mm  # +- two pixels of partial volume

    rng = np.random.default_rng(3)
    acq = sample_acquisition("chest", rng, 128)
    patient = anatomy_v3.enlarge(sample_patient(rng), rng)
    trees = anatomy_v3.lung_vessel_trees(patient, rng)
    assert len(trees) >= 5 * 15  # 5-7 trunks a side, 15 segments each
    args = (
        acq,
        patient,
        list(coronary_centerlines(patient).values()),
        aorta_centerline(patient, acq.slice_z()[0]),
    )
    plain = tissue.render_tissue(*args, np.random.default_rng(0))
    with_vessels = tissue.render_tissue(*args, np.random.default_rng(0), trees)
    changed = with_vessels != plain
    assert changed.sum() > 1000
    # Painted only where the lungs were (a voxel on an organ's one-pixel edge blends both).
    assert np.mean(plain[changed] >= tissue.LUNG_VESSEL_BELOW_HU) < 0.02
    assert dataclasses.replace(patient, chambers=False).chambers is False
