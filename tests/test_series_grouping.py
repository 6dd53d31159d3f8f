"""Series without SeriesInstanceUID (research exports): grouped by folder and physical series key, built and
scored like the UID route; pydicom's per-file warnings counted per series, never printed."""

from __future__ import annotations

import glob
import json
import os
import warnings

import numpy as np
import pydicom
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from calcjax.data import scan_sources
from calcjax.io import dicom, dicom_series, discover, records
from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

SALT = "grouping-test-salt"
SIZE = 64
UID_TAGS = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
BAD_UID = "8.08513147666027414054.04552668.72271347501905238661971497165692"  # a COCA-style invalid UID


@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    """Two small phantom scans, each in its own folder with its UIDs (the reference route)."""
    out = tmp_path_factory.mktemp("uid_route")
    folders = []
    for i, protocol in ((0, "cardiac"), (1, "chest")):
        scan = generate_scan(31, i, protocol, size=SIZE, target_category=3)
        folders.append(write_scan(scan, str(out), seed=31, index=i))
    return folders


def _strip_uids(src_files, dst_folder, prefix, edit=None):
    os.makedirs(dst_folder, exist_ok=True)
    for k, f in enumerate(src_files):
        ds = pydicom.dcmread(f)
        for tag in UID_TAGS:
            if tag in ds:
                delattr(ds, tag)
        if edit is not None:
            edit(k, ds)
        ds.save_as(os.path.join(dst_folder, f"{prefix}{k:04d}.dcm"))


def _dicom_files(folder):
    return sorted(glob.glob(os.path.join(folder, "dicom", "*.dcm")))


def _mixed_folder(two_series, root):
    """Both series' files, without any UID, interleaved in one folder."""
    folder = os.path.join(root, "export")
    for prefix, src in zip(("a", "b"), two_series, strict=True):
        _strip_uids(_dicom_files(src), folder, prefix)
    return folder


def test_two_uidless_series_in_one_folder_are_two_scans_identical_to_the_uid_route(two_series, tmp_path):
    _mixed_folder(two_series, str(tmp_path / "nouid"))
    found, bad = dicom_series.find_series(str(tmp_path / "nouid"))
    assert bad == [] and len(found) == 2
    assert {s.grouping for s in found} == {"geometry"}
    ref = {}
    for folder in two_series:
        vol = dicom.read_series(_dicom_files(folder))
        ref[vol.hu.shape] = vol
    assert len(ref) == 2  # the two phantoms differ in slice count
    for s in found:
        vol = dicom.read_series(s.files)
        want = ref[vol.hu.shape]
        np.testing.assert_array_equal(vol.hu, want.hu)
        assert vol.grid == want.grid
        assert {k: v for k, v in vol.meta.items()} == want.meta


def test_uidless_build_gives_the_uid_route_records_and_marks_the_grouping(two_series, tmp_path):
    _mixed_folder(two_series, str(tmp_path / "nouid"))
    uid_root = tmp_path / "uid"
    for folder in two_series:
        dst = uid_root / os.path.basename(folder)
        os.makedirs(dst)
        for f in _dicom_files(folder):
            os.symlink(f, dst / os.path.basename(f))
    stacks = {}
    for route in ("uid", "nouid"):
        out = str(tmp_path / f"shards-{route}")
        m = builder.build(
            builder.BuildOptions(str(tmp_path / route), out, split="all=1", salt=SALT, progress=False)
        )
        assert m["num_scans"] == 2 and m["num_errors"] == 0
        assert {s["series_grouping"] for s in m["scans"]} == {"uid" if route == "uid" else "geometry"}
        by_count = {}
        for scan in m["scans"]:
            reader = ArrayRecordReader(os.path.join(out, scan["shard"]))
            recs = [
                records.decode(b)
                for b in reader.read(scan["record_start"], scan["record_start"] + scan["num_records"])
            ]
            reader.close()
            by_count[scan["num_records"]] = np.stack([r["image"] for r in recs])
        stacks[route] = by_count
    assert stacks["uid"].keys() == stacks["nouid"].keys()
    for n in stacks["uid"]:
        np.testing.assert_array_equal(stacks["uid"][n], stacks["nouid"][n])


def test_score_route_lists_uidless_series_with_their_grouping(two_series, tmp_path):
    _mixed_folder(two_series, str(tmp_path / "nouid"))
    scans, errors = scan_sources.dicom_scans(str(tmp_path / "nouid"), context=1, salt=SALT)
    assert errors == [] and len(scans) == 2
    assert {s.load().meta["series_grouping"] for s in scans} == {"geometry"}
    # Same input, same salt: the same ids (stable across runs); different series: different ids.
    again, _ = scan_sources.dicom_scans(str(tmp_path / "nouid"), context=1, salt=SALT)
    assert [s.scan_id for s in scans] == [s.scan_id for s in again]
    assert len({s.scan_id for s in scans}) == 2
    # The id does not depend on which folder above the series is searched (the instances' UIDs name it).
    from_parent, _ = scan_sources.dicom_scans(str(tmp_path), context=1, salt=SALT)
    assert {s.scan_id for s in from_parent} == {s.scan_id for s in scans}


def test_gated_sequential_acquisition_numbers_stay_one_series(two_series, tmp_path):
    """Step-and-shoot gated scans number each table position as its own acquisition (COCA gated: 4-5 per
    series): without UIDs they must still be one series."""
    src = _dicom_files(two_series[0])
    _strip_uids(
        src, str(tmp_path / "in"), "s", edit=lambda k, ds: setattr(ds, "AcquisitionNumber", 2 + k // 12)
    )
    found, _ = dicom_series.find_series(str(tmp_path / "in"))
    assert len(found) == 1 and len(found[0].files) == len(src)


def test_two_acquisitions_of_the_same_range_are_split(two_series, tmp_path):
    src = _dicom_files(two_series[0])
    folder = str(tmp_path / "in")

    def second(k, ds):
        ds.AcquisitionNumber = 7
        px = ds.pixel_array.copy()
        px[0, 0] += 1
        ds.PixelData = px.tobytes()

    _strip_uids(src, folder, "a", edit=lambda k, ds: setattr(ds, "AcquisitionNumber", 3))
    _strip_uids(src, folder, "b", edit=second)
    found, _ = dicom_series.find_series(folder)
    assert len(found) == 2
    assert sorted(len(s.files) for s in found) == [len(src), len(src)]
    assert all({os.path.basename(f)[0] for f in s.files} in ({"a"}, {"b"}) for s in found)


def test_reader_warnings_are_counted_per_series_and_never_printed(two_series, tmp_path, capfd, caplog):
    folder = str(tmp_path / "in")
    src = _dicom_files(two_series[1])

    def bad_uid(k, ds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.SOPInstanceUID = BAD_UID[:-3] + f"{k:03d}"

    _strip_uids(src, folder, "x", edit=bad_uid)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs, errors = discover.discover(folder, salt=SALT, split=[("all", 1.0)], split_seed=0)
        vol = dicom.read_series(jobs[0].files)
    assert caught == []  # nothing escaped to Python's warnings
    printed = capfd.readouterr()
    assert "Invalid value" not in printed.out + printed.err
    assert len(jobs) == 1 and vol.hu.shape[0] == len(src)
    warn_lines = [e for e in errors if e["kind"] == "reader_warnings"]
    assert len(warn_lines) == 1 and warn_lines[0]["severity"] == "warning"
    assert f"{len(src)} x Invalid value for VR UI" in warn_lines[0]["reason"]
    # One log line for the series, and no UID text in it or in the errors entry.
    logged = [r for r in caplog.records if "reader warning" in r.getMessage()]
    assert len(logged) == 1
    for text in (json.dumps(errors), logged[0].getMessage()):
        assert BAD_UID[:20] not in text
