"""A model's figures on the QRM calcification insert (calcjax.research.qrm_check): a synthetic insert of the
QRM layout here, the real Canon scan when the real sample ($CALCJAX_REAL_DATA) is present."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from calcjax.core import agatston
from calcjax.data import qrm
from calcjax.inference import predictor as inference
from calcjax.inference import qrm_figures
from calcjax.model import network as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("CALCJAX_REAL_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
QRM_DICOM = os.path.join(REAL, "qrm-canon", "dicom")
PEAKS_HU = {"low": 300.0, "medium": 600.0, "high": 1100.0}


def qrm_layout_volume(size: int = 64, seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """HU ``(8, size, size)`` at (3, 0.5, 0.5) mm: 75 HU soft tissue (SD 8 HU noise) holding the QRM layout
    (``calcjax.data.qrm``): three rays 120 degrees apart, one density each, a 5 mm insert 12 mm from the axis
    (slices 3-4), a 3 mm one 4.5 mm further in (slice 3), a 1 mm one another 4.5 mm in (slice 3)."""
    rng = np.random.default_rng(seed)
    hu = 75.0 + rng.normal(0.0, 8.0, (8, size, size))
    yy, xx = np.mgrid[:size, :size] * 0.5
    c = size * 0.25
    for density, angle in zip(("low", "medium", "high"), (90.0, 210.0, 330.0), strict=True):
        u = np.array([np.sin(np.radians(angle)), np.cos(np.radians(angle))])
        for k, (diameter, slices) in enumerate(((5.0, (3, 5)), (3.0, (3, 4)), (1.0, (3, 4)))):
            cy, cx = c + u * (12.0 - 4.5 * k)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (diameter / 2) ** 2
            hu[slices[0] : slices[1], disc] = PEAKS_HU[density]
    return hu.astype(np.float32), (3.0, 0.5, 0.5)


def test_the_reference_is_the_large_and_medium_inserts_at_130_hu():
    hu, spacing = qrm_layout_volume()
    ref = qrm_figures.QrmReference.from_volume(hu, spacing)
    bright = hu >= agatston.CALCIUM_THRESHOLD_HU
    assert not (ref.reference & ~bright).any() and not (ref.reference & ~ref.cylinders).any()
    # the 1 mm inserts (slice 3, 2-4 pixels each) lie in the cylinders but not in the reference
    assert (ref.cylinders & bright & ~ref.reference).sum() > 0
    small = ref.cylinders & bright & ~ref.reference
    assert ref.reference.sum() == (bright & ref.cylinders).sum() - small.sum()
    whole = agatston.score(hu, (ref.cylinders & bright).astype(np.uint8), spacing)["agatston"]
    assert ref.agatston_reference == pytest.approx(whole) and whole > 0
    with pytest.raises(qrm.InsertNotFoundError):
        qrm_figures.QrmReference.from_volume(np.full_like(hu, 40.0), spacing)


def test_figures_count_what_is_found_and_what_lies_outside_the_cylinders():
    hu, spacing = qrm_layout_volume()
    ref = qrm_figures.QrmReference.from_volume(hu, spacing)
    labels = np.zeros(hu.shape, np.uint8)
    found = ref.reference.copy()
    found[:, : hu.shape[1] // 2] = False  # the reference voxels of the upper half only
    labels[found] = 2
    labels[0, 0, :5] = 1  # five voxels far from any insert
    probability = np.where(labels > 0, 0.9, 0.1).astype(np.float32)
    out = qrm_figures.figures(ref, labels, probability)
    share = found.sum() / ref.reference.sum()
    assert 0 < share < 1
    assert out["qrm_voxel_recall"] == pytest.approx(share)
    assert out["qrm_calcium_probability"] == pytest.approx(0.1 + 0.8 * share, rel=1e-5)
    assert out["qrm_fp_voxels_outside"] == 5
    assert 0 < out["qrm_agatston"] < out["qrm_agatston_reference"]
    with pytest.raises(ValueError, match="do not match"):
        qrm_figures.figures(ref, labels[1:], probability[1:])


def test_a_models_calcium_probability_is_what_its_labels_threshold():
    """Predictor.calcium_probability is 1 - P(background) of the forward the labels come from: calcium
    labels exactly where it exceeds 0.5; the figures of a real (untrained) model are within their ranges."""
    hu, spacing = qrm_layout_volume()
    cfg = model_lib.ModelConfig(
        num_classes=5, in_channels=3, stem_features=8, widths=(8, 16), block_layers=(1, 1), growth_rate=4,
        bottleneck_width=16, bottleneck_growth=4, dilations=(1, 2), decoder_layers=(1, 1), hu_min=-400.0,
        hu_max=1200.0, dtype="float32", pixel_mm=0.0,
    )  # fmt: skip
    model = model_lib.new_model(cfg, 3)
    predictor = inference.Predictor(model, batch_size=4)
    hu16 = np.rint(hu).astype(np.int16)
    labels = predictor.predict(hu16, spacing)
    probability = predictor.calcium_probability(hu16, spacing)
    assert probability.shape == hu.shape and probability.dtype == np.float32
    assert 0.0 <= probability.min() and probability.max() <= 1.0
    clear = np.abs(probability - 0.5) > 1e-4
    assert np.array_equal((labels > 0)[clear], (probability > 0.5)[clear])
    # a model reading 1 mm pixels: its map comes back on the scan's 0.5 mm grid, where its labels are
    coarse = inference.Predictor(model_lib.new_model(dataclasses.replace(cfg, pixel_mm=1.0), 3))
    coarse_probability = coarse.calcium_probability(hu16, spacing)
    assert coarse_probability.shape == hu.shape
    assert np.mean((coarse.predict(hu16, spacing) > 0) == (coarse_probability > 0.5)) > 0.9
    ref = qrm_figures.QrmReference.from_volume(hu, spacing)
    out = qrm_figures.evaluate(predictor, ref)
    assert 0.0 <= out["qrm_calcium_probability"] <= 1.0 and 0.0 <= out["qrm_voxel_recall"] <= 1.0
    assert out["qrm_fp_voxels_outside"] == int(((labels > 0) & ~ref.cylinders).sum())


@pytest.mark.skipif(not os.path.isdir(QRM_DICOM), reason=f"real QRM scan not found at {QRM_DICOM}")
def test_the_real_qrm_scans_reference():
    """The Canon scan: 1,206 reference voxels (235 + 48 + 305 + 83 + 421 + 114 over the six large and medium
    inserts, measured 2026-12-01) and the HU-only Agatston of the nine
    cylinders, 957.6 (the sum of calcjax.data.qrm's per-insert rows: 137.4 / 236.7 / 396.3 at 5 mm ...)."""
    ref = qrm_figures.QrmReference.load(QRM_DICOM)
    assert ref.hu.shape == (47, 512, 512)
    assert int(ref.reference.sum()) == 1206
    assert ref.agatston_reference == pytest.approx(957.6, abs=0.1)


def test_the_command_names_the_folder_in_one_line_when_it_holds_no_insert(tmp_path):
    """A folder without a CT series: one stderr line naming it, exit status 2, nothing on stdout."""
    run = subprocess.run(
        [sys.executable, "-m", "calcjax.research.qrm_check", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr
    lines = [
        line for line in run.stderr.splitlines() if line.startswith("calcjax.research.qrm_check: error:")
    ]
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "Traceback" not in run.stderr
    assert run.stdout == ""
