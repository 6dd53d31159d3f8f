"""The report's overlay crops show the disagreements they claim, even when these are scattered."""

from __future__ import annotations

import numpy as np

from calcjax.data.scan_sources import LoadedScan
from calcjax.io.geometry import Grid
from calcjax.report import markdown as report
from calcjax.score import rows as score_rows


def _scan():
    """A 256x256 slice with bright ribs at both edges called calcium (extra), a plaque in the middle the
    prediction misses, and a small lesion given the wrong artery on another slice."""
    hu = np.full((3, 256, 256), 40, np.int16)
    ref = np.zeros(hu.shape, np.uint8)
    pred = np.zeros(hu.shape, np.uint8)
    hu[1, 100:140, 2:12] = 700  # left rib: 400 voxels, predicted RCA
    pred[1, 100:140, 2:12] = 4
    hu[1, 100:130, 244:254] = 700  # right rib: 300 voxels, predicted RCA
    pred[1, 100:130, 244:254] = 4
    hu[1, 120:126, 126:132] = 500  # plaque in the middle, LAD, missed
    ref[1, 120:126, 126:132] = 2
    hu[2, 60:63, 60:63] = 300  # LCX called LM
    ref[2, 60:63, 60:63] = 3
    pred[2, 60:63, 60:63] = 1
    grid = Grid(
        shape=hu.shape, spacing=(3.0, 0.5, 0.5), origin=(0, 0, 0), row_dir=(1, 0, 0), col_dir=(0, 1, 0)
    )
    return LoadedScan(hu, ref, grid, {"protocol": "cardiac"}), pred


def test_each_kind_of_disagreement_gets_a_crop_centred_on_its_largest_component():
    loaded, pred = _scan()
    crops = score_rows.disagreement_crops(loaded, pred)
    by_kind = {c["kind"]: c for c in crops}
    assert [c["kind"] for c in crops] == ["extra", "missed", "wrong artery"]  # largest component first
    extra, missed, wrong = by_kind["extra"], by_kind["missed"], by_kind["wrong artery"]
    assert extra["voxels"] == 400 and extra["slice"] == 1
    # The largest extra component (the left rib) is inside its crop; the mean of all differing voxels
    # (between the ribs, near the plaque) would have shown neither rib.
    assert (extra["pred"] == 4).sum() == 400
    assert missed["voxels"] == 36 and (missed["ref"] == 2).sum() == 36 and missed["slice"] == 1
    assert wrong["voxels"] == 9 and wrong["slice"] == 2
    assert (wrong["ref"] == 3).sum() == 9 and (wrong["pred"] == 1).sum() == 9
    for c in crops:
        assert c["hu"].shape == (score_rows.OVERLAY_CROP, score_rows.OVERLAY_CROP)


def test_agreement_gives_no_crop():
    loaded, _ = _scan()
    assert score_rows.disagreement_crops(loaded, loaded.labels.copy()) == []


def test_overlay_figure_draws_one_panel_row_per_component(tmp_path):
    loaded, pred = _scan()
    crops = score_rows.disagreement_crops(loaded, pred)
    (tmp_path / "overlays").mkdir()
    np.savez_compressed(
        tmp_path / "overlays" / "scan-x.npz",
        **{f"{i}_{k}": c[k] for i, c in enumerate(crops) for k in ("hu", "pred", "ref")},
    )
    row = {
        "scan_id": "scan-x",
        "disagreements": [{k: c[k] for k in ("kind", "voxels", "slice")} for c in crops],
    }
    path = str(tmp_path / "overlays.png")
    assert report.overlay_figure(str(tmp_path), [row], path) == 3
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
