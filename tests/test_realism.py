"""The phantom-vs-real measurement: each figure measures what it names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from data_prep.phantom import realism

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("CALCJAX_REAL_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
COCA = os.path.join(REAL, "coca-sample")


def test_nps_tells_white_noise_from_kernel_correlated_noise():
    rng = np.random.default_rng(0)
    white = [rng.normal(40.0, 10.0, (realism.NPS_ROI_PX,) * 2) for _ in range(16)]
    smooth = [
        ndimage.gaussian_filter(rng.normal(0.0, 10.0, (96, 96)), 1.5)[32:64, 32:64] + 40 for _ in range(16)
    ]
    w = realism.noise_power(white, 0.5, 0.5)
    s = realism.noise_power(smooth, 0.5, 0.5)
    assert w["noise_sd_hu"] == pytest.approx(10.0, rel=0.05)
    # White noise: flat spectrum, mean frequency near the middle of the band; correlated: far lower.
    assert 0.45 < w["mean_frequency_per_mm"] / w["nyquist_per_mm"] < 0.75
    assert s["mean_frequency_per_mm"] < 0.5 * w["mean_frequency_per_mm"]
    # Parseval: the NPS integrates to the variance (HU^2) over the 2D frequency plane.
    assert np.sum(w["nps_hu2_mm2"]) > 0


def test_bright_components_count_objects_outside_the_labels_inside_the_body():
    hu = np.full((2, 40, 40), -1000, np.int16)
    hu[:, 5:35, 5:35] = 40  # body
    hu[0, 10:13, 10:13] = 300  # labelled plaque: not counted
    hu[0, 20:22, 20:22] = 200  # 4 px = 1 mm^2 at 0.5 mm
    hu[1, 25, 25] = 500  # 1 px
    hu[1, 0:3, 0:3] = 500  # outside the body: not counted
    labels = np.zeros(hu.shape, np.uint8)
    labels[0, 10:13, 10:13] = 2
    body = realism.body_mask(hu)
    b = realism.bright_components(hu, labels, body, (3.0, 0.5, 0.5))
    assert b["per_slice"] == 1.0 and b["per_slice_ge_1mm2"] == 0.5
    assert sorted(b["areas_mm2"]) == [0.25, 1.0]


def test_lesion_fat_reads_what_each_lesion_sits_in():
    hu = np.full((3, 60, 80), 40, np.int16)  # soft tissue
    hu[:, :, :30] = -100  # fat on the left
    labels = np.zeros(hu.shape, np.uint8)
    labels[1, 29:31, 9:11] = 2  # in the fat
    labels[1:3, 29:31, 59:61] = 4  # in soft tissue, two slices: one lesion
    hu[labels > 0] = 400
    fat = realism.lesion_fat(hu, labels, (3.0, 0.5, 0.5))
    assert fat["fat_5mm"] == [1.0, 0.0]  # 5 mm = 10 px: each disc stays on its own side
    assert 0.3 < fat["fat_15mm"][0] < 0.9 and fat["fat_15mm"][1] == 0.0  # 30 px reaches across for the first
    assert realism.lesion_fat(hu, np.zeros_like(labels), (3.0, 0.5, 0.5)) == {"fat_5mm": [], "fat_15mm": []}


def test_every_group_gets_every_figure(tmp_path):
    phantoms = realism.phantom_scans(1, seed=2, size=96)
    groups = {**phantoms, "real gated": phantoms["phantom gated"], "real chest": phantoms["phantom chest"]}
    result = realism.measure(groups)
    path = str(tmp_path / "r.jsonl")
    realism.write_jsonl(result, path)
    lines = [json.loads(line) for line in open(path)]
    figures = {(x["group"], x["figure"]) for x in lines}
    for group in realism.GROUPS:
        for figure in ("hu_body", "hu_heart", "nps", "bright", "lesions", "lesion_fat"):
            assert (group, figure) in figures
    # The same scans under two names measure the same.
    by = {(x["group"], x["figure"]): x for x in lines}
    assert by[("real gated", "nps")] == {**by[("phantom gated", "nps")], "group": "real gated"}
    realism.plot(result, str(tmp_path / "r.png"))
    assert open(tmp_path / "r.png", "rb").read(4) == b"\x89PNG"


@pytest.mark.skipif(not os.path.isdir(COCA), reason=f"no real sample at {COCA} (set CALCJAX_REAL_DATA)")
def test_realism_command_on_the_real_sample(tmp_path):
    out = tmp_path / "realism"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.phantom.realism", "--real", COCA, "--out", str(out)]
        + ["--phantoms", "1", "--size", "128"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in open(out / "realism.jsonl")]
    by = {(x["group"], x["figure"]): x for x in lines}
    assert by[("real gated", "scans")]["value"] == 3 and by[("real chest", "scans")]["value"] == 2
    # The real gated lesions are the XML's: 24 counted 2D lesions over the three scans.
    assert by[("real gated", "lesions")]["per_scan"] == pytest.approx(8.0)
    assert ("real chest", "lesions") not in by  # the chest sample has a sheet, no masks
