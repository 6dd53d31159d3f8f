"""data_prep.build: phantom round trip, bad inputs, kill and resume, no identifying values in any output."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from pydicom.data import get_testdata_file

from calcjax.io import deid, records
from calcjax.io.discover import scan_id_of
from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

SALT = "build-test-salt-0"
SIZE = 96


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Six small phantom scans written once: {index: (scan, folder)}."""
    out = tmp_path_factory.mktemp("phantoms")
    scans = {}
    for i in range(6):
        scan = generate_scan(
            21, i, "cardiac" if i % 2 == 0 else "chest", size=SIZE, target_category=(i % 4) + 1
        )
        scans[i] = (scan, write_scan(scan, str(out), seed=21, index=i))
    return scans


def series_uid(folder):
    return str(pydicom.dcmread(glob.glob(os.path.join(folder, "dicom", "*.dcm"))[0]).SeriesInstanceUID)


def decode_split(out, manifest, split):
    recs = []
    for shard in manifest["splits"][split]["shards"]:
        reader = ArrayRecordReader(os.path.join(out, shard["file"]))
        recs += [records.decode(b) for b in reader.read_all()]
        reader.close()
    return recs


def test_round_trip_dicom_to_shards_gives_the_phantom_hu_and_labels(phantoms, tmp_path):
    src = tmp_path / "in"
    for i in range(4):
        shutil.copytree(phantoms[i][1], src / os.path.basename(phantoms[i][1]))
    out = str(tmp_path / "shards")
    m = builder.build(
        builder.BuildOptions(str(src), out, split="train=0.5,test=0.5", context=1, salt=SALT, progress=False)
    )
    assert m["num_scans"] == 4 and m["num_errors"] == 0
    by_id = {scan_id_of(series_uid(folder), SALT): scan for scan, folder in phantoms.values()}
    seen = set()
    for split in m["splits"]:
        recs = decode_split(out, m, split)
        assert len(recs) == m["splits"][split]["num_records"]
        calcium = set(m["splits"][split]["calcium_records"])
        for i, rec in enumerate(recs):
            scan = by_id[rec["scan_id"]]
            k = rec["slice_index"]
            assert rec["image"].shape == (3,) + scan.hu.shape[1:]
            np.testing.assert_array_equal(rec["image"][1], scan.hu[k])
            np.testing.assert_array_equal(rec["image"][0], scan.hu[max(k - 1, 0)])
            np.testing.assert_array_equal(rec["label"], scan.label[k])
            assert rec["has_calcium"] == bool(scan.label[k].any()) == (i in calcium)
            assert rec["protocol"] == scan.acquisition.protocol
            seen.add(rec["scan_id"])
        # Each scan contiguous, in z order.
        ids = [r["scan_id"] for r in recs]
        for sid in set(ids):
            idx = [i for i, x in enumerate(ids) if x == sid]
            assert idx == list(range(idx[0], idx[0] + len(idx)))
            assert [recs[i]["slice_index"] for i in idx] == list(range(len(idx)))
    assert len(seen) == 4
    for scan_meta in m["scans"]:
        scan = by_id[scan_meta["scan_id"]]
        assert scan_meta["reference"]["agatston"] == pytest.approx(scan.truth["reference"]["agatston"])


def test_xml_labels_build_the_same_records_as_nifti(phantoms, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(phantoms[1][1], src / "one")
    a = builder.build(
        builder.BuildOptions(
            str(src), str(tmp_path / "a"), split="train=1", salt=SALT, label_format="nifti", progress=False
        )
    )
    b = builder.build(
        builder.BuildOptions(
            str(src), str(tmp_path / "b"), split="train=1", salt=SALT, label_format="xml", progress=False
        )
    )
    assert a["scans"][0]["label_format"] == "nifti" and b["scans"][0]["label_format"] == "xml"
    ra, rb = decode_split(str(tmp_path / "a"), a, "train"), decode_split(str(tmp_path / "b"), b, "train")
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])


def bad_input_tree(phantoms, root):
    """Two good scans, and one of each kind of bad input."""
    for i in (0, 1):
        shutil.copytree(phantoms[i][1], root / f"good{i}")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "IM-0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(500))
    shutil.copytree(phantoms[2][1], root / "truncated")
    victim = sorted(glob.glob(str(root / "truncated" / "dicom" / "*.dcm")))[3]
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    mr = root / "mr" / "series"
    mr.mkdir(parents=True)
    mr_dir = os.path.join(
        os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests", "98892003", "MR700"
    )
    for f in glob.glob(os.path.join(mr_dir, "*")):
        shutil.copy(f, mr)
    mixed = root / "mixed"
    mixed.mkdir()
    for i in (3, 4):
        for f in glob.glob(os.path.join(phantoms[i][1], "dicom", "*.dcm")):
            shutil.copy(f, mixed / f"s{i}-{os.path.basename(f)}")
    shutil.copy(os.path.join(phantoms[3][1], "label.nii.gz"), mixed / "label.nii.gz")
    shutil.copytree(phantoms[5][1], root / "badmask")
    img = nib.load(root / "badmask" / "label.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), root / "badmask" / "label.nii.gz")


def test_bad_inputs_are_listed_and_good_scans_built(phantoms, tmp_path):
    bad_input_tree(phantoms, tmp_path / "in")
    out = str(tmp_path / "shards")
    m = builder.build(
        builder.BuildOptions(str(tmp_path / "in"), out, split="train=1", salt=SALT, progress=False)
    )
    built = {s["scan_id"] for s in m["scans"]}
    expected = {scan_id_of(series_uid(phantoms[i][1]), SALT) for i in (0, 1, 3)}
    assert built == expected
    errors = [json.loads(line) for line in open(os.path.join(out, "errors.jsonl"))]
    # Outputs name inputs by salted names; the private map beside salt.txt traces them back.
    where = dict(line.rstrip("\n").split("\t") for line in open(os.path.join(out, deid.PRIVATE_MAP)))
    assert not any(os.sep in e["input"] or e["input"] in ("corrupt", "mixed") for e in errors)
    kinds = {(where[e["input"]].split(os.sep)[0], e["kind"]) for e in errors}
    assert ("corrupt", "not_dicom") in kinds
    assert ("truncated", "truncated") in kinds
    assert ("mr", "not_ct") in kinds
    assert ("mixed", "label_grid_mismatch") in kinds
    assert ("badmask", "label_grid_mismatch") in kinds
    mixed = next(e for e in errors if where[e["input"]] == "mixed")
    assert "2 series share this folder" in mixed["reason"]
    assert len(errors) == 5 and m["num_errors"] == 5


def identifying_strings(folder):
    out = set()
    for f in glob.glob(os.path.join(folder, "dicom", "*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out |= {
            str(ds.PatientName),
            str(ds.PatientID),
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID),
            str(ds.AccessionNumber),
            str(ds.StudyDate),
            str(ds.FrameOfReferenceUID),
        }
        out |= set(str(ds.PatientName).split("^"))
    return out


def test_no_identifying_value_in_any_output_byte(phantoms, tmp_path):
    bad_input_tree(phantoms, tmp_path / "in")
    out = tmp_path / "shards"
    builder.build(
        builder.BuildOptions(
            str(tmp_path / "in"), str(out), split="train=0.5,val=0.5", salt=SALT, progress=False
        )
    )
    secrets = set()
    for i in range(6):
        secrets |= identifying_strings(phantoms[i][1])
    texts = [p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.endswith(".array_record")]
    binaries = []
    for shard in out.glob("*.array_record"):
        reader = ArrayRecordReader(str(shard))
        for raw in reader.read_all():
            rec = records.decode(raw)
            pixels = (rec["image"].tobytes(), rec["label"].tobytes())
            texts.append(raw.replace(pixels[0], b"").replace(pixels[1], b""))  # every non-pixel byte
            binaries += pixels
        reader.close()
        binaries.append(shard.read_bytes())
    assert len(texts) > 10
    for secret in secrets:
        needle = secret.encode()
        assert not any(needle in t for t in texts), secret
        if len(needle) >= 8:  # shorter strings occur by chance in megabytes of pixels
            assert not any(needle in b for b in binaries), secret


def test_a_build_killed_five_times_and_rerun_gives_the_shards_of_an_uninterrupted_build(phantoms, tmp_path):
    src = tmp_path / "in"
    for i in range(6):
        shutil.copytree(phantoms[i][1], src / f"s{i}")
    args = ["--input", str(src), "--split", "train=1", "--records_per_shard", "10", "--salt", SALT]
    ref = tmp_path / "ref"
    subprocess.run(
        [sys.executable, "-m", "data_prep.build", *args, "--out", str(ref)], check=True, capture_output=True
    )
    out = tmp_path / "killed"
    rng = random.Random(5)
    for _ in range(5):  # each run killed after 0-1 more shards, at a random moment of the next one
        proc = subprocess.Popen([sys.executable, "-m", "data_prep.build", *args, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        target, deadline = len(list(out.glob("*.array_record"))) + rng.randint(0, 1), time.time() + 120
        while (
            time.time() < deadline and len(list(out.glob("*.array_record"))) < target and proc.poll() is None
        ):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the build finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(list(out.glob("*.array_record")))
    assert 0 < done_before < len(list(ref.glob("*.array_record")))
    subprocess.run(
        [sys.executable, "-m", "data_prep.build", *args, "--out", str(out)], check=True, capture_output=True
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for shard in ref.glob("*.array_record"):
        a, b = ArrayRecordReader(str(shard)), ArrayRecordReader(str(out / shard.name))
        assert a.read_all() == b.read_all()
    ma, mb = json.loads((ref / "manifest.json").read_text()), json.loads((out / "manifest.json").read_text())
    ma.pop("seconds", None)
    mb.pop("seconds", None)
    assert ma == mb


def test_a_build_from_a_process_that_imported_jax_spawns_its_workers(phantoms, tmp_path):
    """A process that imported jax is multithreaded, and a fork of it can deadlock (jax warns so at every
    fork): the shard workers are spawned, so building from a notebook that imported calcjax forks nothing,
    and the shards are byte for byte those of a build in one process."""
    src = tmp_path / "in"
    for i in range(4):
        shutil.copytree(phantoms[i][1], src / os.path.basename(phantoms[i][1]))
    one = str(tmp_path / "one")
    builder.build(builder.BuildOptions(str(src), one, split="train=1", records_per_shard=20, salt=SALT,
                                       progress=False))  # fmt: skip
    code = (
        "import sys, jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready(); "
        "from data_prep import builder; "
        "builder.build(builder.BuildOptions(sys.argv[1], sys.argv[2], split='train=1', records_per_shard=20, "
        "salt=sys.argv[3], workers=2, progress=False))"
    )
    two = str(tmp_path / "two")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-c", code, str(src), two, SALT]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "os.fork()" not in proc.stderr and "deadlock" not in proc.stderr, proc.stderr[-2000:]
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(one, "*.array_record")))
    assert len(shards) > 1 and shards == sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(two, "*.array_record"))
    )
    for name in shards:
        with open(os.path.join(one, name), "rb") as a, open(os.path.join(two, name), "rb") as b:
            assert a.read() == b.read(), name


def _copy_series(src: str, dst, series_uid: str, patient_id: str) -> None:
    """The phantom's DICOM files rewritten into ``dst`` as another series of the given patient."""
    os.makedirs(dst)
    for path in sorted(glob.glob(os.path.join(src, "dicom", "*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.PatientID = series_uid, patient_id
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(os.path.join(dst, os.path.basename(path)))


@pytest.mark.parametrize("layout", ["coca", "patient_id"])
def test_patient_level_split_keeps_a_patients_series_together(phantoms, tmp_path, layout):
    """Two series per patient (the COCA release's patient/<id>/ folders, or a PatientID in flat folders):
    split by patient, both land in one split; split by series, some patient is torn apart."""
    from calcjax.io.discover import discover

    root = tmp_path / "release"
    for i, (_, folder) in enumerate(phantoms.values()):
        for k in range(2):
            where = root / "patient" / f"{i}" / f"series{k}" if layout == "coca" else root / f"s{i}-{k}"
            _copy_series(
                folder, where, f"1.2.826.0.1.3680043.99.{i}.{k}", f"P{i}" if layout != "coca" else ""
            )
    ratios = [("a", 0.5), ("b", 0.5)]

    def patients_split(split_by: str) -> list[set[str]]:
        jobs, errors = discover(str(root), salt=SALT, split=ratios, split_seed=3, split_by=split_by,
                                private_map=(names := {}))  # fmt: skip
        assert not errors and len(jobs) == 12
        by_patient: dict[str, set[str]] = {}
        for j in jobs:
            rel = names[j.scan_id]
            patient = rel.split(os.sep)[1] if layout == "coca" else rel.split("-")[0]
            by_patient.setdefault(patient, set()).add(j.split)
        return list(by_patient.values())

    assert all(len(s) == 1 for s in patients_split("patient"))
    assert any(len(s) == 2 for s in patients_split("series"))
    assert {next(iter(s)) for s in patients_split("patient")} == {"a", "b"}
