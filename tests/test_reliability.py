"""Reliability: checkpoint checksums, no identifying text in outputs, no stale shards on
reruns, one job per output folder, no resume with another model, no silent zero for labels that cannot be
placed, no weak salt, no orphan workers, one-line errors, no mixed slice thickness, no output searched as
input."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from calcjax.core import cli
from calcjax.io import deid, dicom, labels, outputs, preprocess
from calcjax.model import checkpoint
from calcjax.score import cohort as score
from calcjax.score.options import ScoreOptions
from calcjax.train import checkpoint as train_checkpoint
from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "reliability-test-salt"
# Words planted in folder names, file names and headers: none may reach any output or log.
PLANTED = ("Doeberling", "Janetta", "MRN98765432", "ACC555XYZ", "Accession")


@pytest.fixture(scope="module")
def two_scans(tmp_path_factory):
    """Two small phantom scan folders (``dicom/``, ``label.nii.gz``, ``calcium.xml``)."""
    base = tmp_path_factory.mktemp("reliability")
    return [
        write_scan(
            generate_scan(31, i, "cardiac", size=48, target_category=2 + i),
            str(base / "store"),
            seed=31,
            index=i,
        )
        for i in range(2)
    ]


def _copy_scan(folder: str, dest, *, rename: str | None = None, headers: dict | None = None) -> list[str]:
    """A copy of a phantom scan folder; files renamed ``<rename>_NNNN.dcm`` and headers rewritten."""
    os.makedirs(dest, exist_ok=True)
    out = []
    for i, f in enumerate(sorted(glob.glob(os.path.join(folder, "dicom", "*.dcm")))):
        target = os.path.join(dest, f"{rename}_{i:04d}.dcm" if rename else os.path.basename(f))
        if headers:
            ds = pydicom.dcmread(f)
            for k, v in headers.items():
                setattr(ds, k, v)
            ds.save_as(target)
        else:
            shutil.copy(f, target)
        out.append(target)
    for name in ("label.nii.gz", "calcium.xml"):
        shutil.copy(os.path.join(folder, name), os.path.join(dest, name))
    return out


def planted_tree(two_scans, root) -> None:
    """Identifying words in folder names, file names and headers, around good and bad inputs."""
    who = {"PatientName": "Doeberling^Janetta", "PatientID": "MRN98765432", "AccessionNumber": "ACC555XYZ"}
    _copy_scan(
        two_scans[0], root / "Doeberling_Janetta_MRN98765432", rename="Doeberling_Janetta", headers=who
    )
    second = root / "Accession ACC555XYZ Doeberling"
    files = _copy_scan(two_scans[1], second, rename="Janetta", headers=who)
    with open(files[4], "r+b") as f:  # one truncated file: the scan fails when it is read
        f.truncate(os.path.getsize(files[4]) // 2)
    (second / "notes Janetta.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))  # not DICOM
    mr = root / "Doeberling MR"
    mr.mkdir()
    mr_dir = os.path.join(
        os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests", "98892003", "MR700"
    )
    for f in glob.glob(os.path.join(mr_dir, "*")):
        shutil.copy(f, mr / f"Janetta_{os.path.basename(f)}.dcm")


def _assert_clean(folders, texts=()) -> int:
    """No planted word (any case) and no input path text in any byte of the folders (but the private salt
    and map) or in ``texts``; returns the number of files checked."""
    checked = 0
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if name in (deid.SALT_FILE, deid.PRIVATE_MAP):
                    continue
                data = open(os.path.join(dirpath, name), "rb").read().lower()
                for word in PLANTED:
                    assert word.lower().encode() not in data, (word, name)
                checked += 1
    for text in texts:
        for word in PLANTED:
            assert word.lower() not in text.lower(), word
    return checked


def test_no_input_path_text_or_header_value_in_any_output_or_log(two_scans, tmp_path, caplog, capfd):
    planted_tree(two_scans, tmp_path / "in")
    shards, scored = tmp_path / "shards", tmp_path / "scored"
    with caplog.at_level("WARNING"):
        m = builder.build(
            builder.BuildOptions(str(tmp_path / "in"), str(shards), split="all=1", salt=SALT, progress=False)
        )
        s = score.score_cohort(
            ScoreOptions(
                checkpoint_path=None,
                out=str(scored),
                dicom_dir=str(tmp_path / "in"),
                num_bootstrap=20,
                progress=True,
            )
        )
    assert m["num_scans"] == 1 and s["scored"] == 1 and s["failed"] == 1
    captured = capfd.readouterr()
    checked = _assert_clean([shards, scored], [caplog.text, captured.out, captured.err])
    assert checked >= 8
    assert str(tmp_path) not in caplog.text + captured.err
    # Every name the outputs use traces back through the private map, to the right input.
    for out in (shards, scored):
        where = dict(line.rstrip("\n").split("\t") for line in open(out / deid.PRIVATE_MAP))
        errors = outputs.read_jsonl(str(out / "errors.jsonl"))
        assert {e["kind"] for e in errors} >= {"not_dicom", "not_ct", "truncated"}
        for e in errors:
            assert e["input"] in where, e
        not_dicom = next(e for e in errors if e["kind"] == "not_dicom")
        assert where[not_dicom["input"]] == os.path.join(
            "Accession ACC555XYZ Doeberling", "notes Janetta.dcm"
        )
        truncated = next(e for e in errors if e["kind"] == "truncated")
        assert where[truncated["scan_id"]] == "Accession ACC555XYZ Doeberling"
        assert f"{truncated['scan_id']} file 5 of " in truncated["reason"]
    rows = outputs.read_jsonl(str(scored / "scores.jsonl"))
    assert rows[0]["source"] == "dicom" and where[rows[0]["scan_id"]] == "Doeberling_Janetta_MRN98765432"


def test_scrub_paths_removes_folder_words_in_any_case(tmp_path):
    root = str(tmp_path / "cohort")
    path = os.path.join(root, "Doe_Jane_MRN98765432", "IM1.dcm")
    text = f"[Errno 2] No such file: '{path}' (see doe_jane_mrn98765432) under {root}"
    clean = deid.scrub_paths(text, root, [path])
    assert "doe_jane" not in clean.lower() and root not in clean and "IM1" not in clean
    assert clean.startswith("[Errno 2] No such file: '")


def test_rerun_with_new_inputs_or_settings_is_refused_and_the_same_rerun_finishes(two_scans, tmp_path):
    src, out = tmp_path / "in", tmp_path / "shards"
    _copy_scan(two_scans[0], src / "a")
    first = builder.build(builder.BuildOptions(str(src), str(out), split="all=1", salt=SALT, progress=False))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")}
    # The same rerun keeps every finished shard and gives the same manifest.
    again = builder.build(builder.BuildOptions(str(src), str(out), split="all=1", salt=SALT, progress=False))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")} == before
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in first.items() if k != "seconds"
    }
    # A new scan: refused, naming the change and the fix; nothing in OUT changes.
    _copy_scan(two_scans[1], src / "b")
    with pytest.raises(builder.BuildRecordError, match=r"num_scans: 1 then, 2 now.*new --out"):
        builder.build(builder.BuildOptions(str(src), str(out), split="all=1", salt=SALT, progress=False))
    shutil.rmtree(src / "b")
    with pytest.raises(builder.BuildRecordError, match=r"context: 1 then, 2 now"):
        builder.build(
            builder.BuildOptions(str(src), str(out), split="all=1", salt=SALT, context=2, progress=False)
        )
    # A changed input file (same name, new content): refused too.
    victim = sorted(glob.glob(str(src / "a" / "*.dcm")))[0]
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(builder.BuildRecordError, match="inputs_sha256"):
        builder.build(builder.BuildOptions(str(src), str(out), split="all=1", salt=SALT, progress=False))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")} == before
    assert json.load(open(out / "manifest.json"))["settings"]["context"] == 1


def test_shards_without_a_build_record_are_not_adopted(two_scans, tmp_path):
    src, out = tmp_path / "in", tmp_path / "shards"
    _copy_scan(two_scans[0], src / "a")
    builder.build(builder.BuildOptions(str(src), str(out), split="all=1", salt=SALT, progress=False))
    os.remove(out / "build.json")  # as an older calcjax left it
    with pytest.raises(builder.BuildRecordError, match="without a build record"):
        builder.build(builder.BuildOptions(str(src), str(out), split="all=1", salt=SALT, progress=False))


def test_a_second_job_on_one_output_folder_is_refused(two_scans, tmp_path):
    src = tmp_path / "in"
    _copy_scan(two_scans[0], src / "a")
    for out, module, args in (
        (tmp_path / "scored", "calcjax.score", ["--dicom", str(src)]),
        (tmp_path / "shards", "data_prep.build", ["--input", str(src), "--salt", SALT]),
    ):
        with outputs.FolderLock(str(out), "a test holding the folder"):
            proc = subprocess.run(
                [sys.executable, "-m", module, *args, "--out", str(out)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=300,
            )
            assert proc.returncode == 2, proc.stderr
            assert "is in use by a test holding the folder" in proc.stderr and "Traceback" not in proc.stderr
            assert sorted(os.listdir(out)) == [outputs.LOCK_FILE]  # nothing written, no temporary left
        with outputs.FolderLock(str(out), "the next job"):  # released: the folder is free again
            pass


def test_resume_with_another_model_or_settings_is_refused(two_scans, tmp_path):
    from calcjax.model import files as model_file

    src, out = tmp_path / "in", tmp_path / "scored"
    _copy_scan(two_scans[0], src / "a")
    _copy_scan(two_scans[1], src / "b")
    kw = dict(out=str(out), dicom_dir=str(src), num_bootstrap=0, progress=False)
    score.score_cohort(ScoreOptions(checkpoint_path=None, **kw))
    rows = outputs.read_jsonl(str(out / "scores.jsonl"))
    record = json.load(open(out / "run.json"))
    assert record["model_sha256"] == model_file.sha256_of(model_file.DEFAULT_MODEL)
    import jax
    from flax import nnx

    config, model, _ = model_file.load(model_file.DEFAULT_MODEL)
    nnx.update(model, jax.tree.map(lambda x: x * 0.5, nnx.state(model, nnx.Param)))
    other = str(tmp_path / "other.msgpack")
    model_file.save(other, config, model)
    with pytest.raises(outputs.RunRecordError, match="model_sha256"):
        score.score_cohort(ScoreOptions(checkpoint_path=other, resume=True, **kw))
    with pytest.raises(outputs.RunRecordError, match="kvp_specific_threshold"):
        score.score_cohort(ScoreOptions(checkpoint_path=None, resume=True, kvp_specific_threshold=True, **kw))
    assert record["heart_region"] is True and {r["heart_region"] for r in rows} <= {"found", "not_found"}
    with pytest.raises(outputs.RunRecordError, match="heart_region"):
        score.score_cohort(ScoreOptions(checkpoint_path=None, resume=True, use_heart_region=False, **kw))
    assert outputs.read_jsonl(str(out / "scores.jsonl")) == rows
    s = score.score_cohort(ScoreOptions(checkpoint_path=None, resume=True, **kw))  # the same model: resumes
    assert s["skipped_already_scored"] == 2 and s["scored"] == 0


def test_coca_rois_outside_the_image_are_an_error_not_a_zero(two_scans, tmp_path):
    import plistlib

    folder = tmp_path / "scan"
    _copy_scan(two_scans[0], folder)
    with open(folder / "calcium.xml", "rb") as f:
        plist = plistlib.load(f)
    for image in plist["Images"]:
        for roi in image["ROIs"]:
            roi["Point_px"] = [f"({float(p.strip('()').split(',')[0]) + 500}, 10.0)" for p in roi["Point_px"]]
    with open(folder / "calcium.xml", "wb") as f:
        plistlib.dump(plist, f)
    files = sorted(glob.glob(str(folder / "*.dcm")))
    with pytest.raises(labels.LabelOutsideError, match="outside the 48x48 image"):
        preprocess.read_scan(files, label_path=str(folder / "calcium.xml"), label_format="xml")
    m = builder.build(
        builder.BuildOptions(
            str(folder),
            str(tmp_path / "shards"),
            split="all=1",
            salt=SALT,
            label_format="xml",
            progress=False,
        )
    )
    errors = outputs.read_jsonl(str(tmp_path / "shards" / "errors.jsonl"))
    assert m["num_scans"] == 0 and [e["kind"] for e in errors] == ["label_outside_image"]


@pytest.mark.parametrize("salt", ["", "   \n", "short-salt"])
def test_empty_or_short_salt_is_refused(tmp_path, salt):
    (tmp_path / "salt.txt").write_text(salt)
    with pytest.raises(deid.SaltError, match="at least 12"):
        deid.load_salt(str(tmp_path))
    with pytest.raises(deid.SaltError, match="at least 12"):
        deid.load_salt(str(tmp_path / "fresh"), given=salt or "x")


def test_salt_is_written_atomically(tmp_path, monkeypatch):
    def fail(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        deid.load_salt(str(tmp_path))
    assert os.listdir(tmp_path) == []  # no salt.txt, empty or half-written, and no temporary
    monkeypatch.undo()
    salt = deid.load_salt(str(tmp_path))
    assert len(salt) == 32 and deid.load_salt(str(tmp_path)) == salt


def test_build_workers_exit_when_the_build_is_killed(two_scans, tmp_path):
    src = tmp_path / "in"
    for i in range(6):
        _copy_scan(two_scans[i % 2], src / f"s{i}", headers={"SeriesInstanceUID": pydicom.uid.generate_uid()})
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep.build", "--input", str(src), "--out", str(tmp_path / "out")]
        + ["--workers", "2", "--records_per_shard", "10", "--salt", SALT],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list[int] = []
    deadline = time.time() + 120
    while time.time() < deadline and len(children) < 2 and proc.poll() is None:
        children = _children(proc.pid)
        time.sleep(0.05)
    assert len(children) >= 2, "the build ended before its workers could be seen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.2)
    assert not any(_alive(c) for c in children), "a worker outlived the killed build"


def _children(pid: int) -> list[int]:
    out = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        out += [int(c) for c in open(task).read().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "code, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")]
)
def test_os_errors_stop_a_job_with_one_line(capsys, code, words):
    def job():
        raise OSError(code, os.strerror(code), "/data/out/scores.jsonl")

    with pytest.raises(SystemExit) as e:
        cli.run_or_exit("calcjax.score", job)
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err.count("\n") == 1
        and words in err
        and err.startswith("calcjax.score: error:")
    )


def test_a_damaged_checkpoint_is_one_line_and_its_checksum_catches_a_flipped_byte(tmp_path):
    import optax

    from calcjax.model import network as model_lib
    from calcjax.train import step as ts
    from calcjax.train.loop import _to_dict
    from configs import smoke

    config = smoke.get_config()
    model = model_lib.new_model(model_lib.ModelConfig.from_config(config.model), 5)
    _, state = ts.create_state(model, optax.sgd(0.1))
    run = str(tmp_path / "run")
    ckpt = train_checkpoint.Checkpointer(run, async_save=False)
    ckpt.save_best(state, _to_dict(config), {"val_voxel_f1": 0.0})
    ckpt.close()
    folder = checkpoint.resolve(run)
    assert open(os.path.join(folder, checkpoint.CHECKSUM_FILE)).read().strip() == checkpoint.folder_sha256(
        folder
    )
    checkpoint.load_for_inference(run)  # sealed and intact: loads
    chunks = sorted(
        glob.glob(os.path.join(folder, "params", "ocdbt.process_0", "d", "*")), key=os.path.getsize
    )
    data = bytearray(open(chunks[-1], "rb").read())
    data[len(data) // 2] ^= 0x01  # one flipped bit, which may still decode to finite numbers
    open(chunks[-1], "wb").write(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="no longer match"):
        checkpoint.load_for_inference(run)
    # Without its checksum, the damaged folder is still refused with one line by the scorer's CLI.
    os.remove(os.path.join(folder, checkpoint.CHECKSUM_FILE))
    shutil.rmtree(os.path.join(folder, "params", "ocdbt.process_0"))
    proc = subprocess.run(
        [sys.executable, "-m", "calcjax.score", "--dicom", str(tmp_path), "--checkpoint", run]
        + ["--out", str(tmp_path / "scored")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    # One line: Orbax's failed sibling reads ("Exception ignored in <coroutine ...>") are not printed.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot be read as a calcjax checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "TensorStore details" not in proc.stderr, (
        proc.stderr
    )


def test_mixed_slice_thickness_in_one_series_is_refused(two_scans, tmp_path):
    files = _copy_scan(two_scans[0], tmp_path / "scan")
    ds = pydicom.dcmread(files[7])
    ds.SliceThickness = float(ds.SliceThickness) + 2.0
    ds.save_as(files[7])
    with pytest.raises(dicom.MixedThicknessError, match="slice thickness") as e:
        dicom.read_series(files)
    assert e.value.path == files[7]


def test_an_output_folder_inside_the_input_is_not_searched(two_scans, tmp_path):
    src = tmp_path / "in"
    _copy_scan(two_scans[0], src / "a")
    out = src / "shards"
    for _ in range(2):  # the rerun sees its own shards inside the input
        m = builder.build(builder.BuildOptions(str(src), str(out), split="all=1", salt=SALT, progress=False))
        assert m["num_scans"] == 1 and m["num_errors"] == 0 and m["num_warnings"] == 0
    scored = src / "scored"
    s = score.score_cohort(
        ScoreOptions(
            checkpoint_path=None, out=str(scored), dicom_dir=str(src), num_bootstrap=0, progress=False
        )
    )
    assert s["scored"] == 1 and outputs.read_jsonl(str(scored / "errors.jsonl")) == []
    assert np.isfinite(outputs.read_jsonl(str(scored / "scores.jsonl"))[0]["agatston"])


@pytest.mark.parametrize("module", ["calcjax.score", "data_prep.build"])
def test_an_output_folder_that_cannot_be_made_is_one_line(two_scans, tmp_path, module):
    forbidden = "/sys/calcjax-reliability-test/out"  # sysfs: no new folders, even for root
    if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_make("/sys/calcjax-reliability-test"):
        pytest.skip("no unwritable folder to try here")
    src = tmp_path / "in"
    _copy_scan(two_scans[0], src / "a")
    args = ["--dicom", str(src)] if module == "calcjax.score" else ["--input", str(src), "--salt", SALT]
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--out", forbidden],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"{module}: error: ") and proc.stderr.count("\n") == 1


def _can_make(path: str) -> bool:
    try:
        os.makedirs(path)
    except OSError:
        return False
    os.rmdir(path)
    return True


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_a_disk_that_fills_mid_job_stops_it_with_one_line_and_a_resume_loses_nothing(
    two_scans, tmp_path, monkeypatch, capsys, code, words
):
    """The third score row reaches the disk torn (part of its line) when the disk fills / turns
    read-only: the job stops with one line (exit 2), writes no CSV or report that looks complete, and a
    resume ends with the rows of an uninterrupted run, each once."""
    src = tmp_path / "in"
    for i in range(4):
        _copy_scan(two_scans[i % 2], src / f"s{i}", headers={"SeriesInstanceUID": pydicom.uid.generate_uid()})
    (tmp_path / "salt.txt").write_text(SALT)

    def options(out, **kw):
        return ScoreOptions(out=str(tmp_path / out), dicom_dir=str(src), salt_file=str(tmp_path / "salt.txt"),
                            progress=False, num_bootstrap=0, **kw)  # fmt: skip

    score.score_cohort(options("whole"))
    whole = {
        r["scan_id"]: r["agatston"] for r in outputs.read_jsonl(str(tmp_path / "whole" / "scores.jsonl"))
    }
    real_append, calls = outputs.append_jsonl, []

    def failing_append(path, row):
        if path.endswith("scores.jsonl"):
            if len(calls) == 2:
                with open(path, "a") as f:
                    f.write(json.dumps(row)[:40])  # the part of the line that reached the disk
                raise OSError(code, os.strerror(code), path)
            calls.append(row["scan_id"])
        real_append(path, row)

    monkeypatch.setattr(outputs, "append_jsonl", failing_append)
    with pytest.raises(SystemExit) as e:
        cli.run_or_exit("calcjax.score", lambda: score.score_cohort(options("cut")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err
    assert not os.path.exists(tmp_path / "cut" / "scores.csv") and not os.path.exists(
        tmp_path / "cut" / "report.md"
    )
    monkeypatch.undo()
    summary = score.score_cohort(options("cut", resume=True))
    rows = outputs.read_jsonl(str(tmp_path / "cut" / "scores.jsonl"))
    assert summary["skipped_already_scored"] == 2 and summary["scored"] == 2
    assert sorted(r["scan_id"] for r in rows) == sorted(whole)  # every scan once
    assert {r["scan_id"]: r["agatston"] for r in rows} == whole
