"""The NIfTI route (``calcjax.score --nifti``) and the Python API (``calcjax.score_volume``) score a phantom
as the DICOM route does (the same labels; the API the same figures, the NIfTI route the same to the float32
precision of NIfTI's voxel sizes); a NIfTI in another voxel order scores the same; bad volumes are refused
with the file, the header field and the rule."""

from __future__ import annotations

import glob
import json
import os

import nibabel as nib
import numpy as np
import pytest

from calcjax.io import dicom, nifti
from data_prep.phantom.generator import generate_scan, write_scan

EXACT = ("risk_category", "num_lesions", "threshold_hu", "heart_region")
# NIfTI keeps voxel sizes as float32 (pixdim), DICOM as decimal strings: areas and volumes agree to that.
FLOAT32_REL = 1e-6


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A cardiac phantom in which the shipped model finds calcium (one of data_prep.check_install's set) as
    a DICOM folder and as NIfTI files of the same volume: one in the DICOM route's voxel order and one as
    dcm2niix writes (rows flipped), plus two that must be refused."""
    base = tmp_path_factory.mktemp("nifti")
    folder = write_scan(generate_scan(2026, 4, "cardiac", size=256), str(base / "dicom"), seed=2026, index=4)
    vol = dicom.read_series(sorted(glob.glob(os.path.join(folder, "dicom", "*.dcm"))))
    good = base / "nifti"
    good.mkdir()
    nifti.write_ct_nifti(str(good / "a.nii.gz"), vol.hu, vol.grid)
    img = nib.load(str(good / "a.nii.gz"))
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    flip[1, 3] = img.shape[1] - 1  # voxel j -> (ny - 1 - j): rows in the other order, same positions
    affine = img.affine @ flip
    flipped = nib.Nifti1Image(np.asarray(img.dataobj)[:, ::-1, :].copy(), affine)
    flipped.set_qform(affine, code=1)
    flipped.set_sform(affine, code=1)
    nib.save(flipped, str(good / "b_rows_flipped.nii.gz"))
    bad = base / "bad"
    bad.mkdir()
    no_orientation = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    no_orientation.set_qform(None, code=0)
    no_orientation.set_sform(None, code=0)
    nib.save(no_orientation, str(bad / "no_orientation.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1024, img.affine), str(bad / "stored_values.nii.gz"))
    return {"base": base, "dicom": folder, "nifti": str(good), "bad": str(bad), "vol": vol}


def _score(out, **kw) -> list[dict]:
    from calcjax.score import cohort
    from calcjax.score.options import ScoreOptions

    cohort.score_cohort(ScoreOptions(out=str(out), progress=False, num_bootstrap=10, save_masks=True, **kw))
    with open(os.path.join(out, "scores.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_nifti_reads_back_the_dicom_volume_and_grid(scans):
    vol = scans["vol"]
    for name in ("a.nii.gz", "b_rows_flipped.nii.gz"):
        got = nifti.read_ct_nifti(os.path.join(scans["nifti"], name))
        np.testing.assert_array_equal(got.hu, np.rint(vol.hu))
        np.testing.assert_allclose(got.grid.spacing, vol.grid.spacing, rtol=1e-6)
        np.testing.assert_allclose(got.grid.origin, vol.grid.origin, atol=1e-4)
        np.testing.assert_allclose(got.grid.col_dir, vol.grid.col_dir, atol=1e-6)


def test_nifti_route_and_score_volume_score_as_the_dicom_route(scans, tmp_path):
    import calcjax

    (dicom_row,) = _score(tmp_path / "d", dicom_dir=scans["dicom"])
    dicom_mask = nib.load(os.path.join(tmp_path / "d", "masks", f"{dicom_row['scan_id']}.nii.gz"))
    nifti_rows = _score(tmp_path / "n", nifti_dir=scans["nifti"])
    assert len(nifti_rows) == 2
    assert dicom_row["agatston"] > 0, "the phantom should show calcium to compare"
    for row in nifti_rows:
        assert {k: row[k] for k in EXACT} == {k: dicom_row[k] for k in EXACT}
        assert row["agatston"] == pytest.approx(dicom_row["agatston"], rel=FLOAT32_REL)
        assert row["volume_mm3"] == pytest.approx(dicom_row["volume_mm3"], rel=FLOAT32_REL)
        for artery, value in dicom_row["agatston_per_artery"].items():
            assert row["agatston_per_artery"][artery] == pytest.approx(value, rel=FLOAT32_REL)
        mask = nib.load(os.path.join(tmp_path / "n", "masks", f"{row['scan_id']}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(dicom_mask.dataobj))
        assert row["source"] == "nifti" and "nii" not in json.dumps(row)  # no file names in the outputs
    vol = scans["vol"]
    result = calcjax.score_volume(vol.hu, vol.grid.spacing)
    assert result.agatston == dicom_row["agatston"]
    assert result.risk_category == dicom_row["risk_category"]
    assert result.heart_region == dicom_row["heart_region"]
    np.testing.assert_array_equal(result.labels, np.asarray(dicom_mask.dataobj).transpose(2, 1, 0))


def test_bad_nifti_volumes_are_recorded_with_the_field_and_the_rule(scans, tmp_path):
    from calcjax.score import cohort
    from calcjax.score.options import ScoreOptions

    cohort.score_cohort(ScoreOptions(out=str(tmp_path / "o"), nifti_dir=scans["bad"], progress=False))
    with open(tmp_path / "o" / "errors.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert {e["kind"] for e in lines} == {"bad_nifti"} and all(e["input"] == e["scan_id"] for e in lines)
    reasons = sorted(e["reason"] for e in lines)
    assert len(reasons) == 2
    assert "qform_code and sform_code are both 0" in reasons[0]
    assert "not HU" in reasons[1]
    assert not any(scans["bad"] in r for r in reasons)  # no path text


@pytest.mark.parametrize(
    ("hu", "spacing", "rule"),
    [
        (np.full((4, 8, 8), np.nan), (3, 0.5, 0.5), "finite number"),
        (np.zeros((8, 8)), (3, 0.5, 0.5), r"\(Z, Y, X\) volume"),
        (np.zeros((4, 8, 8)), (3, 0.0, 0.5), "spacing"),
        (np.zeros((4, 8, 8)), (3, 0.5), "spacing"),
    ],
)
def test_score_volume_refuses_undefined_hu_or_geometry(hu, spacing, rule):
    import calcjax

    with pytest.raises(ValueError, match=rule):
        calcjax.score_volume(hu, spacing)
