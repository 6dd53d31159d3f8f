"""Label discovery in the layouts the README names, and the hash split's stability."""

from __future__ import annotations

import glob
import os
import shutil

import pydicom
import pytest

from calcjax.io import discover
from data_prep.phantom.generator import generate_scan, write_scan

SALT = "discover-test-salt"


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    base = tmp_path_factory.mktemp("discover")
    return [
        write_scan(
            generate_scan(41, i, "cardiac", size=32, target_category=1), str(base / "store"), seed=41, index=i
        )
        for i in range(5)
    ]


def _dicom_only(folder: str, dest) -> None:
    os.makedirs(dest, exist_ok=True)
    for f in glob.glob(os.path.join(folder, "dicom", "*.dcm")):
        shutil.copy(f, dest)


def _jobs(root, **kw):
    jobs, errors = discover.discover(str(root), salt=SALT, split=[("all", 1.0)], split_seed=0, **kw)
    assert not [e for e in errors if e.get("severity") != "warning"], errors
    return jobs


def test_coca_release_layout_finds_each_patients_xml(scans, tmp_path):
    release = tmp_path / "Gated_release_final"
    for pid, folder in zip(("0", "17"), scans[:2], strict=True):
        _dicom_only(folder, release / "patient" / pid / "Pro_Gated_CS_3.0_I30f_3_70%")
        os.makedirs(release / "calcium_xml", exist_ok=True)
        shutil.copy(os.path.join(folder, "calcium.xml"), release / "calcium_xml" / f"{pid}.xml")
    _dicom_only(scans[2], release / "patient" / "99" / "series")  # no XML for patient 99: unlabelled
    jobs = {os.path.basename(os.path.dirname(os.path.dirname(j.files[0]))): j for j in _jobs(release)}
    assert jobs["0"].label_path == str(release / "calcium_xml" / "0.xml") and jobs["0"].label_format == "xml"
    assert jobs["17"].label_path == str(release / "calcium_xml" / "17.xml")
    assert jobs["99"].label_path is None and jobs["99"].label_format is None


@pytest.mark.parametrize("form", ["<series>.nii.gz", "<series>/label.nii.gz", "<parent>/label.nii.gz"])
def test_a_labels_tree_mirroring_the_input_is_found_first(scans, tmp_path, form):
    src, tree = tmp_path / "in", tmp_path / "labels"
    _dicom_only(scans[0], src / "patient-a" / "ct")
    shutil.copy(os.path.join(scans[0], "calcium.xml"), src / "patient-a" / "ct" / "calcium.xml")  # loses
    target = {
        "<series>.nii.gz": tree / "patient-a" / "ct.nii.gz",
        "<series>/label.nii.gz": tree / "patient-a" / "ct" / "label.nii.gz",
        "<parent>/label.nii.gz": tree / "patient-a" / "label.nii.gz",
    }[form]
    os.makedirs(target.parent, exist_ok=True)
    shutil.copy(os.path.join(scans[0], "label.nii.gz"), target)
    (job,) = _jobs(src, labels_dir=str(tree))
    assert job.label_path == str(target) and job.label_format == "nifti"
    (job,) = _jobs(src)  # without the tree: the XML beside the series
    assert job.label_format == "xml"


def test_split_is_stable_as_scans_are_added(scans, tmp_path):
    src = tmp_path / "in"
    ratios = [("train", 0.6), ("val", 0.2), ("test", 0.2)]
    for i in range(2):
        _dicom_only(scans[i], src / f"s{i}")
    before = {
        j.scan_id: j.split for j in discover.discover(str(src), salt=SALT, split=ratios, split_seed=3)[0]
    }
    for i in range(2, 5):
        _dicom_only(scans[i], src / f"s{i}")
    after = {
        j.scan_id: j.split for j in discover.discover(str(src), salt=SALT, split=ratios, split_seed=3)[0]
    }
    assert len(before) == 2 and len(after) == 5
    assert {k: after[k] for k in before} == before
    # Another seed or salt reassigns (the split is a function of both, not of the scan order).
    uids = [
        str(pydicom.dcmread(glob.glob(os.path.join(s, "dicom", "*.dcm"))[0]).SeriesInstanceUID) for s in scans
    ]
    many = [discover.scan_id_of(u + str(k), SALT) for u in uids for k in range(40)]
    a = [discover.split_of(s, 3, ratios) for s in many]
    b = [discover.split_of(s, 4, ratios) for s in many]
    assert a != b and abs(a.count("train") / len(a) - 0.6) < 0.1
