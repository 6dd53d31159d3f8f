"""The lesion-insertion probe (calcjax.research.lesion_probe): erasing, painting, counting, and its
command."""

import json
import subprocess
import sys

import numpy as np
from scipy import ndimage

from calcjax.data import scan_sources
from calcjax.io import geometry
from calcjax.research import lesion_probe

SPACING = (3.0, 0.5, 0.5)


def _volume():
    """Fat (-100 HU) with a soft-tissue band, two labelled lesions (one faint on 2 slices, one bright)."""
    hu = np.full((6, 64, 64), -100, np.int16)
    hu[:, 40:48, :] = 40
    labels = np.zeros(hu.shape, np.uint8)
    yy, xx = np.indices((64, 64))
    faint = (yy - 20) ** 2 + (xx - 20) ** 2 <= 9
    bright = (yy - 20) ** 2 + (xx - 45) ** 2 <= 6
    for z in (2, 3):
        hu[z][faint] = 180
        labels[z][faint] = 2
    hu[4][bright] = 700
    labels[4][bright] = 4
    return hu, labels


def test_erasing_leaves_no_calcium_where_the_lesions_were_and_touches_nothing_else():
    hu, labels = _volume()
    out = lesion_probe.erase_lesions(hu, labels)
    assert out.max() < 130
    assert np.all(out[labels > 0] == -100)  # the rings around both lesions are fat
    far = np.ones(hu.shape, bool)
    far[2:5, 10:31, 10:56] = False
    assert np.array_equal(out[far], hu[far].astype(np.float32))


def test_one_standard_lesion_per_reference_lesion_at_its_centroid_with_the_asked_peak():
    hu, labels = _volume()
    out, discs = lesion_probe.insert_lesions(hu, labels, SPACING, peak_hu=350.0, sigma_mm=1.0)
    assert out.dtype == np.int16
    assert [z for z, _ in discs] == [2, 4]  # the faint lesion's centroid (slice 2.5) rounds to 2
    assert out[2, 20, 20] == 350 and out[4, 20, 45] == 350
    assert out[3].max() < 130  # the faint lesion's second slice is erased, not painted
    for z, m in discs:
        # g > 0.3 around the centre: radius sqrt(2 ln(1/0.3)) sigma = 1.55 mm = 3 px -> 29 pixels
        assert 21 <= m.sum() <= 37 and out[z][m].max() == 350


class _ThresholdPredictor:
    """Calls calcium (LAD) wherever HU >= ``cut``: a model whose only rule is a threshold."""

    in_channels = 1  # reads one slice

    def __init__(self, cut):
        self.cut = cut

    def predict(self, hu, spacing):
        assert spacing == SPACING
        return np.where(hu >= self.cut, 2, 0).astype(np.uint8)


def test_probe_counts_found_lesions_per_peak_and_the_reference_baseline():
    hu, labels = _volume()
    grid = geometry.Grid(hu.shape, SPACING, (0.0, 0.0, 0.0))
    loaded = scan_sources.LoadedScan(hu, labels, grid, {"protocol": "cardiac"})
    got = lesion_probe.probe_scan(_ThresholdPredictor(300), loaded, (200.0, 350.0, 600.0), sigma_mm=1.0)
    # baseline: only the 700 HU lesion reaches the threshold; inserted lesions are found from 350 HU up
    assert got == {None: (1, 2), 200.0: (0, 2), 350.0: (2, 2), 600.0: (2, 2)}


def test_surround_rings_each_standard_lesion_with_fat_or_soft_tissue_on_its_context_slices():
    hu, labels = _volume()
    plain, _ = lesion_probe.insert_lesions(hu, labels, SPACING, peak_hu=600.0, sigma_mm=1.0)
    soft, discs = lesion_probe.insert_lesions(hu, labels, SPACING, 600.0, 1.0, surround=(40.0, 4.0, 1))
    yy, xx = np.indices((64, 64))
    ring = (np.hypot(yy - 20, xx - 45) * 0.5 > 3.0) & (np.hypot(yy - 20, xx - 45) * 0.5 < 4.0)
    for z in (3, 4, 5):  # the bright lesion's slice 4 and one either side
        assert abs(soft[z][ring].mean() - 40.0) < 6.0 and 5.0 < soft[z][ring].std() < 25.0
    far = np.hypot(yy - 20, xx - 45) * 0.5 > 4.5
    far &= np.hypot(yy - 20, xx - 20) * 0.5 > 4.5  # the faint lesion's surround too
    np.testing.assert_array_equal(soft[:, far], plain[:, far])
    np.testing.assert_array_equal(soft[0], plain[0])  # beyond the context slices
    assert [z for z, _ in discs] == [2, 4] and soft[4, 20, 45] == 600


class _FatRingPredictor:
    """Calls calcium (LAD) at >= 300 HU only where fat (< -50 HU) lies within 3 pixels in-plane: a model
    that has learnt that calcium sits in fat."""

    in_channels = 3

    def predict(self, hu, spacing):
        fat_near = ndimage.minimum_filter(hu, size=(1, 7, 7)) < -50
        return np.where((hu >= 300) & fat_near, 2, 0).astype(np.uint8)


def test_probe_scan_with_surround_tells_a_model_that_needs_fat_from_one_that_does_not():
    hu, labels = _volume()
    grid = geometry.Grid(hu.shape, SPACING, (0.0, 0.0, 0.0))
    loaded = scan_sources.LoadedScan(hu, labels, grid, {"protocol": "cardiac"})
    fat = lesion_probe.probe_scan(_FatRingPredictor(), loaded, (600.0,), 1.0, surround_mm=5.0)
    assert fat[(600.0, "fat")] == (2, 2) and fat[(600.0, "soft tissue")] == (0, 2)
    blind = lesion_probe.probe_scan(_ThresholdPredictor(300), loaded, (600.0,), 1.0, surround_mm=5.0)
    assert blind[(600.0, "fat")] == blind[(600.0, "soft tissue")] == (2, 2)
    assert set(blind) == {None, 600.0, (600.0, "fat"), (600.0, "soft tissue")}


def test_found_by_peak_counts_each_reference_lesion_in_the_band_of_its_own_peak():
    hu, labels = _volume()
    pred = hu >= 300  # finds the 700 HU lesion, not the 180 HU one
    got = lesion_probe.found_by_peak(pred, hu, labels)
    faint, bright = int((hu == 180).sum()), int((hu == 700).sum())
    assert {lo: c.tolist() for lo, c in got.items()} == {
        130.0: [1, 0, faint, 0],  # one lesion over two slices (6-connected), none of it found
        300.0: [0, 0, 0, 0],
        500.0: [1, 1, bright, bright],
        800.0: [0, 0, 0, 0],
    }
    half = pred & (np.indices(hu.shape)[2] < 45)  # half of the bright lesion's columns
    assert lesion_probe.found_by_peak(half, hu, labels)[500.0].tolist() == [1, 1, bright, int(half.sum())]


def test_grown_counts_reach_a_lesions_footprint_at_130_hu_and_count_what_is_extra():
    hu, labels = _volume()
    yy, xx = np.indices((64, 64))
    d2 = (yy - 20) ** 2 + (xx - 45) ** 2
    halo = (d2 <= 16) & (d2 > 6)  # 200 HU around the bright lesion's 700 HU core: the reference has both
    hu[4][halo], labels[4][halo] = 200, 4
    hu[1, 5:8, 5:8] = 500  # an unlabelled bright speck, predicted: one false-positive lesion
    pred = np.where(hu >= 300, 2, 0).astype(np.uint8)  # finds cores only
    core, ring, faint = int((hu[4] >= 300).sum()), int(halo.sum()), int((hu == 180).sum())
    got = lesion_probe.grown_counts(pred, hu, labels, (0, 1, 3))
    assert got[0].tolist() == [core, 9, ring + faint, 1]
    assert core < got[1][0] < core + ring and got[1][1] == 9
    assert got[3].tolist() == [core + ring, 9, faint, 1]  # the whole footprint; the 130 HU edge stops it


def test_command_on_phantom_shards_with_the_shipped_model(tmp_path):
    from data_prep import builder
    from data_prep.phantom.generator import generate_scan, write_scan

    scan = generate_scan(13, 0, "cardiac", size=96, target_category=3)
    write_scan(scan, str(tmp_path / "dicom"), seed=13, index=0)
    builder.build(
        builder.BuildOptions(
            str(tmp_path / "dicom"), str(tmp_path / "shards"), split="test=1", progress=False
        )
    )
    out = tmp_path / "probe" / "probe.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "calcjax.research.lesion_probe",
        f"--shards={tmp_path}/shards/*.array_record",
    ]
    args = [*cmd, "--peaks=600", "--surround_mm=4", f"--out={out}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rows = [r for r in lines if "peak_hu" in r and "surround" not in r]
    ringed = [r for r in lines if "surround" in r]
    assert [(r["peak_hu"], r["surround"], r["surround_mm"]) for r in ringed] == [
        (600.0, "fat", 4.0),
        (600.0, "soft tissue", 4.0),
    ]
    bands = [r for r in lines if "reference_peak_hu" in r]
    grown = [r for r in lines if "grow_px" in r]
    assert len(lines) == len(rows) + len(ringed) + len(bands) + len(grown)
    assert [r["grow_px"] for r in grown] == list(lesion_probe.GROW_PX)
    recalls = [r["recall"] for r in grown]
    assert recalls == sorted(recalls) and all(
        r["voxel_tp"] + r["voxel_fn"] == grown[0]["voxel_tp"] + grown[0]["voxel_fn"] for r in grown
    )
    assert [r["peak_hu"] for r in rows] == [None, 600.0]
    n = rows[0]["lesions"]
    assert n > 0 and all(
        r["lesions"] == n and 0 <= r["found"] <= n and r["scans"] == 1 for r in rows + ringed
    )
    assert [b["reference_peak_hu"] for b in bands] == [
        [130.0, 300.0],
        [300.0, 500.0],
        [500.0, 800.0],
        [800.0, None],
    ]
    assert sum(b["lesions"] for b in bands) > 0 and all(
        b["found_voxels"] <= b["calcium_voxels"] for b in bands
    )
    bad = subprocess.run([*cmd, "--checkpoint=/nonexistent/run"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "/nonexistent/run" in bad.stderr
