"""``data_prep.real_shards``: every labelled real scan as a shard folder of its own (the COCA gated scans
with their masks, the chest scan whose physician score is 0 as all background, the QRM insert labelled
from HU), rebuilt idempotently, with no input name in the outputs. The real sample is never in the
repository: the tests that need it skip when it is absent."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_qrm_check import qrm_layout_volume

from data_prep import real_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("CALCJAX_REAL_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
GATED_REFERENCE = (5.9, 367.4, 111.6)  # the sample's README, patients 0, 1, 2

needs_real = pytest.mark.skipif(
    not os.path.isdir(os.path.join(REAL, "coca-sample"))
    or not os.path.isdir(os.path.join(REAL, "qrm-canon")),
    reason=f"real sample not found at {REAL} (set CALCJAX_REAL_DATA)",
)


def test_qrm_labels_mark_the_inserts_calcium_only():
    hu, spacing = qrm_layout_volume()
    hu[:, 1:4, 1:4] = 600.0  # a bright rod in a corner, as the phantom's calibration rod: not an insert
    lab = real_shards.qrm_labels(hu, spacing)
    assert set(np.unique(lab)) == {0, real_shards.QRM_LABEL}
    assert (hu[lab > 0] >= 130).all() and not lab[:, 1:4, 1:4].any()
    assert (lab > 0).sum() == (hu >= 130).sum() - 8 * 9  # every other calcium voxel is an insert's


def _manifest(out, name):
    with open(os.path.join(out, name, "manifest.json")) as f:
        return json.load(f)


@needs_real
@pytest.mark.slow
def test_every_labelled_real_scan_is_a_shard_folder_of_its_own(tmp_path):
    out = str(tmp_path / "real_shards")
    manifests = real_shards.build_real_shards(REAL, out, progress=False)
    assert list(manifests) == ["gated-1", "gated-2", "gated-3", "chest-zero", "qrm"]
    refs = {}
    for name, m in manifests.items():
        (scan,) = m["scans"]
        assert m["num_scans"] == 1 and scan["labelled"] and scan["split"] == "train"
        refs[name] = scan["reference"]
    for k, expected in enumerate(GATED_REFERENCE, 1):
        assert refs[f"gated-{k}"]["agatston"] == pytest.approx(expected, abs=0.05)
    assert refs["chest-zero"]["agatston"] == 0 and manifests["chest-zero"]["scans"][0]["protocol"] == "chest"
    assert (
        refs["qrm"]["agatston"] > 0 and refs["qrm"]["agatston_per_artery"]["LAD"] == refs["qrm"]["agatston"]
    )
    # a rerun finds everything built; with --thick_mm it adds each gated scan as 5 mm slices
    again = real_shards.build_real_shards(REAL, out, progress=False, thick_mm=5.0)
    assert {n: again[n]["scans"][0]["scan_id"] for n in manifests} == {
        n: m["scans"][0]["scan_id"] for n, m in manifests.items()
    }
    for k in (1, 2, 3):
        (thick,) = again[f"gated-{k}-thick5"]["scans"]
        assert thick["spacing"][0] == 5.0 and thick["slice_thickness_mm"] == 5.0
        assert thick["num_slices"] < manifests[f"gated-{k}"]["scans"][0]["num_slices"]
        assert thick["calcium_slices"]  # calcium kept where partial volume leaves it >= 130 HU
    for name in again:  # no input folder name reaches a shared output
        for file in ("manifest.json", "errors.jsonl", "build.json"):
            with open(os.path.join(out, name, file)) as f:
                text = f.read()
            assert (
                "Gated_release_final" not in text and "deidentified" not in text and "qrm-canon" not in text
            )
