"""DICOM SEG and TID 1500 SR of scored scans (calcjax.report.dicom_outputs): they open in pydicom / highdicom
and read back to exactly the predicted mask and the score row; series without UIDs get new ones; refusals are
clear."""

from __future__ import annotations

import glob
import json
import logging
import os

import highdicom as hd
import numpy as np
import pydicom
import pytest

from calcjax.core import agatston
from calcjax.io import dicom, labels
from calcjax.report import dicom_outputs
from data_prep.phantom.generator import generate_scan, write_scan

SIZE = 64


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two small cardiac phantoms (categories II and IV) as DICOM folders."""
    base = tmp_path_factory.mktemp("dicom_outputs")
    folders = []
    for i, category in enumerate((2, 4)):
        scan = generate_scan(41, i, "cardiac", size=SIZE, target_category=category)
        folders.append(write_scan(scan, str(base / "in"), seed=41, index=i))
    return {"base": base, "dicom": str(base / "in"), "folders": folders}


def _files(folder):
    return sorted(glob.glob(os.path.join(folder, "dicom", "*.dcm")))


def _score(**kw):
    from calcjax.score import cohort as score
    from calcjax.score.options import ScoreOptions

    return score.score_cohort(ScoreOptions(checkpoint_path=None, progress=False, num_bootstrap=20, **kw))


def _rows(out):
    with open(os.path.join(out, "scores.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_random_label_volume_round_trips_through_the_seg(cohort, tmp_path):
    vol = dicom.read_series(_files(cohort["folders"][0]))
    rng = np.random.default_rng(0)
    pred = (rng.uniform(size=vol.hu.shape) < 0.01) * rng.integers(1, 5, vol.hu.shape)
    pred[5:9] = 0  # empty frames are left out of the SEG and must come back as zeros
    pred = pred.astype(np.uint8)
    assert set(np.unique(pred)) == {0, 1, 2, 3, 4}
    sources = dicom_outputs.source_datasets(vol.source, "scan-x")
    path = str(tmp_path / "x.seg.dcm")
    dicom_outputs.write_seg(path, sources, pred, model_sha256="a" * 64, version="0.1.0")

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [f"{a} calcium" for a in agatston.ARTERIES]
    assert [s.AnatomicRegionSequence[0].CodeValue for s in seg.SegmentSequence] == [
        dicom_outputs.ARTERY_CODES[a].value for a in agatston.ARTERIES
    ]
    assert int(seg.NumberOfFrames) < 4 * pred.shape[0]  # empty frames omitted
    # Every referenced instance is one of the source series'.
    assert {str(u) for _, _, u in seg.get_source_image_uids()} <= {str(d.SOPInstanceUID) for d in sources}
    np.testing.assert_array_equal(dicom_outputs.read_seg_labels(path, sources), pred)


def test_a_mask_that_does_not_match_its_series_is_refused(cohort, tmp_path):
    vol = dicom.read_series(_files(cohort["folders"][0]))
    sources = dicom_outputs.source_datasets(vol.source, "scan-x")
    with pytest.raises(dicom_outputs.DicomOutputError, match="does not match the source series"):
        dicom_outputs.write_seg(
            str(tmp_path / "x.seg.dcm"),
            sources,
            np.zeros((3, 8, 8), np.uint8),
            model_sha256="a" * 64,
            version="0",
        )
    with pytest.raises(dicom_outputs.DicomOutputError, match="multi-frame"):
        dicom_outputs.source_datasets([vol.source[0]] * 3, "scan-x")  # one file for every frame


def test_scoring_writes_seg_and_sr_that_read_back_to_the_mask_and_the_row(cohort, tmp_path):
    out = str(tmp_path / "out")
    _score(
        out=out,
        dicom_dir=cohort["dicom"],
        dicom_seg=True,
        dicom_sr=True,
        save_masks=True,
        mass_calibration=0.8,
    )
    rows = _rows(out)
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    assert run["dicom_seg"] and run["dicom_sr"]
    assert len(rows) == 2
    total_calcium = 0
    for row in rows:
        sid = row["scan_id"]
        assert row["dicom_outputs"] == f"{sid}.seg.dcm;{sid}.sr.dcm"
        seg_path = os.path.join(out, "dicom", f"{sid}.seg.dcm")
        sr_path = os.path.join(out, "dicom", f"{sid}.sr.dcm")
        # The scan's source series: the one whose SOP Instance UIDs the SEG references.
        seg = pydicom.dcmread(seg_path)
        ref_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        src_folder = next(
            f for f in cohort["folders"] if pydicom.dcmread(_files(f)[0]).SeriesInstanceUID == ref_series
        )
        vol = dicom.read_series(_files(src_folder))
        sources = dicom_outputs.source_datasets(vol.source, sid)
        mask = labels.read_nifti_label(os.path.join(out, "masks", f"{sid}.nii.gz"), vol.grid)
        np.testing.assert_array_equal(dicom_outputs.read_seg_labels(seg_path, sources), mask)
        total_calcium += int((mask > 0).sum())
        # The SEG carries the source's patient and study (a PACS object must); the scores do not.
        assert seg.PatientID == sources[0].PatientID and seg.StudyInstanceUID == sources[0].StudyInstanceUID
        with open(os.path.join(out, "scores.jsonl")) as f:
            assert str(sources[0].PatientID) not in f.read()

        values = dicom_outputs.read_sr_values(sr_path)
        assert values["agatston"] == pytest.approx(row["agatston"], rel=1e-12, abs=1e-12)
        assert values["volume_mm3"] == pytest.approx(row["volume_mm3"], rel=1e-12, abs=1e-12)
        assert values["mass_mg"] is not None
        assert values["mass_mg"] == pytest.approx(row["mass_mg"], rel=1e-12, abs=1e-12)
        assert values["num_lesions"] == row["num_lesions"]
        assert values["risk_category"] == row["risk_category"]
        for a in agatston.ARTERIES:
            assert values["agatston_per_artery"][a] == pytest.approx(
                row["agatston_per_artery"][a], rel=1e-12, abs=1e-12
            )
        names, versions, params = values["algorithm"]
        assert set(names) == {dicom_outputs.ALGORITHM_NAME}
        assert set(versions) == {__import__("calcjax").__version__}
        assert set(params) == {f"model_sha256={run['model_sha256']}"}
        sr = pydicom.dcmread(sr_path)
        assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (
        total_calcium > 0
    )  # the shipped model finds calcium in these phantoms: the round trip is not vacuous


def test_a_series_without_uids_gets_new_ones_and_a_warning(cohort, tmp_path, caplog):
    folder = os.path.join(str(tmp_path), "in", "export")
    os.makedirs(folder)
    for k, f in enumerate(_files(cohort["folders"][0])):
        ds = pydicom.dcmread(f)
        for tag in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
            delattr(ds, tag)
        ds.save_as(os.path.join(folder, f"s{k:04d}.dcm"), enforce_file_format=False)
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        _score(out=out, dicom_dir=os.path.dirname(folder), dicom_seg=True, dicom_sr=True, save_masks=True)
    (row,) = _rows(out)
    assert row["series_grouping"] == "geometry"
    assert any("has no UIDs" in r.getMessage() for r in caplog.records)
    seg = hd.seg.segread(os.path.join(out, "dicom", f"{row['scan_id']}.seg.dcm"))
    assert pydicom.uid.UID(seg.StudyInstanceUID).is_valid
    vol = dicom.read_series(sorted(glob.glob(os.path.join(folder, "*.dcm"))))
    mask = labels.read_nifti_label(os.path.join(out, "masks", f"{row['scan_id']}.nii.gz"), vol.grid)
    # The made-up instance UIDs exist only in the SEG: count each segment's pixels instead of matching frames.
    made_up = sorted({str(u) for _, _, u in seg.get_source_image_uids()})
    assert len(made_up) == vol.hu.shape[0]  # every slice has its new instance UID
    for number in range(1, 5):
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=made_up, segment_numbers=[number], ignore_spatial_locations=True
        )
        assert int(frames.sum()) == int((mask == number).sum())
    assert dicom_outputs.read_sr_values(os.path.join(out, "dicom", f"{row['scan_id']}.sr.dcm"))[
        "agatston"
    ] == (pytest.approx(row["agatston"], rel=1e-12, abs=1e-12))


def test_the_shard_route_refuses_dicom_outputs(tmp_path):
    with pytest.raises(ValueError, match="need --dicom"):
        _score(out=str(tmp_path / "out"), shards=str(tmp_path / "*.array_record"), dicom_seg=True)


def test_the_seg_renders_over_its_slice(cohort, tmp_path):
    vol = dicom.read_series(_files(cohort["folders"][1]))
    pred = np.zeros(vol.hu.shape, np.uint8)
    pred[10, 20:30, 20:30] = 2  # LAD
    pred[10, 40:45, 40:45] = 4  # RCA
    sources = dicom_outputs.source_datasets(vol.source, "scan-x")
    seg_path = str(tmp_path / "x.seg.dcm")
    dicom_outputs.write_seg(seg_path, sources, pred, model_sha256="b" * 64, version="0.1.0")
    png = str(tmp_path / "overlay.png")
    assert dicom_outputs.render_seg_overlay(seg_path, vol.source, png) == 10
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    saturated = (img.max(axis=-1) - img.min(axis=-1)) > 0.3  # coloured (not grey) pixels: the segments
    assert saturated.sum() > 50
