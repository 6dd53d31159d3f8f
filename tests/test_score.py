"""The batch scorer: shard route = DICOM route, bad inputs recorded, resume after SIGKILL, 8 devices = 1,
and a report whose figures are calcjax.core.metrics on the same scans."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from xla_env import xla_flags

from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("seconds", "source")  # per-run timing and where the scan came from


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four labelled 64x64 phantoms (3 cardiac, 1 chest), their shards (one scan per shard), and a
    checkpoint of a freshly initialised smoke model (its predictions are arbitrary but not empty)."""
    base = tmp_path_factory.mktemp("score")
    for i, (protocol, category) in enumerate((("cardiac", 2), ("cardiac", 3), ("chest", 4), ("cardiac", 1))):
        scan = generate_scan(11, i, protocol, size=64, target_category=category)
        write_scan(scan, str(base / "dicom"), seed=11, index=i)
    shards = str(base / "shards")
    builder.build(
        builder.BuildOptions(str(base / "dicom"), shards, split="test=1", records_per_shard=1, progress=False)
    )
    run = str(base / "run")
    _fresh_checkpoint(run)
    return {"dicom": str(base / "dicom"), "shards": shards, "run": run, "base": base}


def _fresh_checkpoint(run: str) -> None:
    import optax

    from calcjax.model import network as model_lib
    from calcjax.train import checkpoint as train_checkpoint
    from calcjax.train import step as ts
    from calcjax.train.loop import _to_dict
    from configs import smoke

    config = smoke.get_config()
    model = model_lib.new_model(model_lib.ModelConfig.from_config(config.model), 3)
    _, state = ts.create_state(model, optax.sgd(0.1))
    ckpt = train_checkpoint.Checkpointer(run, async_save=False)
    ckpt.save_best(state, _to_dict(config), {"val_voxel_f1": 0.0})
    ckpt.close()


def _score(predictor=None, **kw):
    from calcjax.score import cohort as score
    from calcjax.score.options import ScoreOptions

    return score.score_cohort(ScoreOptions(progress=False, num_bootstrap=50, **kw), predictor=predictor)


def _rows(out: str) -> list[dict]:
    with open(os.path.join(out, "scores.jsonl")) as f:
        return [json.loads(line) for line in f]


def _stable(rows):
    return {r["scan_id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def _cli(*args):
    return [sys.executable, "-m", "calcjax.score", *args]


def test_shard_route_equals_dicom_route(cohort, tmp_path):
    a, b = str(tmp_path / "shards_out"), str(tmp_path / "dicom_out")
    sa = _score(checkpoint_path=cohort["run"], out=a, shards=cohort["shards"] + "/test-*", save_masks=True)
    sb = _score(
        checkpoint_path=cohort["run"],
        out=b,
        dicom_dir=cohort["dicom"],
        salt_file=os.path.join(cohort["shards"], "salt.txt"),
        save_masks=True,
    )
    assert sa["scored"] == sb["scored"] == 4 and sa["failed"] == sb["failed"] == 0
    ra, rb = _stable(_rows(a)), _stable(_rows(b))
    assert ra == rb
    assert any(r["agatston"] > 0 for r in ra.values())  # the comparison is not between empty predictions
    assert all("evaluation" in r and "reference_agatston" in r for r in ra.values())
    for scan_id in ra:
        ma, mb = (nib.load(os.path.join(o, "masks", f"{scan_id}.nii.gz")) for o in (a, b))
        np.testing.assert_array_equal(ma.get_fdata(), mb.get_fdata())
        np.testing.assert_allclose(ma.affine, mb.affine, atol=1e-6)
    # The mask lies on the scan's grid: the same affine as the phantom's own reference label.
    ref_affines = [nib.load(p).affine for p in glob.glob(os.path.join(cohort["dicom"], "*", "label.nii.gz"))]
    for scan_id in ra:
        affine = nib.load(os.path.join(b, "masks", f"{scan_id}.nii.gz")).affine
        assert any(np.allclose(affine, r, atol=1e-4) for r in ref_affines)
    with open(os.path.join(a, "scores.csv")) as f:
        header = f.readline().strip().split(",")
    for column in (
        "scan_id",
        "protocol",
        "num_slices",
        "slice_increment_mm",
        "agatston",
        "agatston_LAD",
        "volume_mm3",
        "mass_mg",
        "risk_category",
        "num_lesions",
        "seconds",
        "reference_agatston",
    ):
        assert column in header


def test_stored_stacks_equal_the_rebuilt_ones(cohort):
    """The scorer rebuilds stacks from centre slices: they must equal the records' own stacks."""
    from array_record.python.array_record_module import ArrayRecordReader

    from calcjax.data import scan_sources
    from calcjax.io import records

    scans, readers = scan_sources.shard_scans(cohort["shards"] + "/test-*", context=1)
    try:
        loaded = scans[0].load()
    finally:
        readers.close()
    shard = os.path.join(cohort["shards"], scans[0].source)
    r = ArrayRecordReader(shard)
    stored = np.stack([np.moveaxis(records.decode(b)["image"], 0, -1) for b in r.read_all()])
    r.close()
    from calcjax.io import preprocess

    np.testing.assert_array_equal(preprocess.slice_stacks(loaded.hu, 1), stored)
    np.testing.assert_array_equal(preprocess.slice_stacks(loaded.hu, 1, 5, 9), stored[5:9])


def test_a_corrupt_record_and_an_unreadable_series_are_recorded_and_the_rest_scored(cohort, tmp_path):
    # Shard route: damage the middle of one scan's shard.
    shards = str(tmp_path / "shards")
    shutil.copytree(cohort["shards"], shards)
    victim = sorted(glob.glob(shards + "/test-*"))[1]
    data = bytearray(open(victim, "rb").read())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    open(victim, "wb").write(bytes(data))
    out = str(tmp_path / "out_shards")
    s = _score(checkpoint_path=cohort["run"], out=out, shards=shards + "/test-*")
    assert s["scored"] == 3 and s["failed"] == 1
    errors = [json.loads(line) for line in open(os.path.join(out, "errors.jsonl"))]
    assert len(errors) == 1 and errors[0]["input"] == os.path.basename(victim)
    assert "Corrupted" in errors[0]["reason"] or "CRC" in errors[0]["reason"]
    assert os.path.isfile(os.path.join(out, "report.md"))

    # DICOM route: one series with a truncated file, and a file that is not DICOM at all.
    dicom = str(tmp_path / "dicom")
    shutil.copytree(cohort["dicom"], dicom)
    series = sorted(glob.glob(os.path.join(dicom, "*", "dicom")))
    bad_file = sorted(glob.glob(os.path.join(series[2], "*.dcm")))[5]
    with open(bad_file, "r+b") as f:
        f.truncate(os.path.getsize(bad_file) // 2)
    with open(os.path.join(dicom, "notes.dcm"), "wb") as f:
        f.write(b"not a dicom file at all")
    out = str(tmp_path / "out_dicom")
    s = _score(checkpoint_path=cohort["run"], out=out, dicom_dir=dicom)
    assert s["scored"] == 3 and s["failed"] == 1
    errors = [json.loads(line) for line in open(os.path.join(out, "errors.jsonl"))]
    stages = sorted(e["stage"] for e in errors)
    assert stages == ["discover", "score"], errors
    failed = next(e for e in errors if e["stage"] == "score")
    # The file is named by its position in its series (the 6th of the sorted files), never by its path.
    assert f"{failed['scan_id']} file 6 of " in failed["reason"] and failed["kind"]
    assert os.path.basename(bad_file) not in failed["reason"]
    text = open(os.path.join(out, "errors.jsonl")).read() + open(os.path.join(out, "scores.jsonl")).read()
    assert "PHANTOM" not in text.upper().replace("PHANTOM-S11", "")  # no phantom patient name leaks
    assert len({r["scan_id"] for r in _rows(out)}) == 3


def test_pipelined_scorer_writes_the_serial_scorers_rows_errors_and_masks(cohort, tmp_path):
    # One damaged series among the DICOM scans: its failure is recorded the same way in both modes.
    dicom = str(tmp_path / "dicom")
    shutil.copytree(cohort["dicom"], dicom)
    bad_file = sorted(
        glob.glob(os.path.join(sorted(glob.glob(os.path.join(dicom, "*", "dicom")))[1], "*.dcm"))
    )[3]
    with open(bad_file, "r+b") as f:
        f.truncate(os.path.getsize(bad_file) // 2)
    kw = dict(checkpoint_path=cohort["run"], lesion_completion_mm2=40.0, save_masks=True)
    outs = {}
    for route, source in (
        ("dicom", dict(dicom_dir=dicom)),
        ("shards", dict(shards=cohort["shards"] + "/test-*")),
    ):
        for workers in (0, 2):
            out = outs[route, workers] = str(tmp_path / f"{route}-{workers}")
            salt = dict(salt_file=os.path.join(cohort["shards"], "salt.txt")) if route == "dicom" else {}
            summary = _score(out=out, workers=workers, **source, **salt, **kw)
            assert summary["scored"] == (3 if route == "dicom" else 4)
    for route in ("dicom", "shards"):
        serial, pipelined = outs[route, 0], outs[route, 2]
        rs, rp = _rows(serial), _rows(pipelined)
        assert [r["scan_id"] for r in rs] == [r["scan_id"] for r in rp]  # the cohort's order
        assert _stable(rs) == _stable(rp) and any(r["agatston"] > 0 for r in rs)
        for scan_id in _stable(rs):
            ms, mp = (
                nib.load(os.path.join(o, "masks", f"{scan_id}.nii.gz")).get_fdata()
                for o in (serial, pipelined)
            )
            np.testing.assert_array_equal(ms, mp)
    errors = [open(os.path.join(outs["dicom", w], "errors.jsonl")).read() for w in (0, 2)]
    assert errors[0] == errors[1] and "file 4 of" in errors[0]


def test_a_higher_calcium_probability_keeps_a_subset_of_the_calcium(cohort, tmp_path):
    masks, rows = {}, {}
    for p in (0.5, 0.9):
        out = str(tmp_path / f"p{p}")
        _score(checkpoint_path=cohort["run"], out=out, shards=cohort["shards"] + "/test-*", save_masks=True,
               calcium_probability=p)  # fmt: skip
        rows[p] = _rows(out)
        masks[p] = {r["scan_id"]: nib.load(os.path.join(out, "masks", f"{r['scan_id']}.nii.gz")).get_fdata()
                    for r in rows[p]}  # fmt: skip
        assert json.load(open(os.path.join(out, "run.json"))).get("calcium_probability", 0.5) == p
    default = str(tmp_path / "default")
    _score(checkpoint_path=cohort["run"], out=default, shards=cohort["shards"] + "/test-*")
    assert _stable(_rows(default)) == _stable(rows[0.5])  # 0.5 is the rule the scorer always had
    kept = sum(int((m > 0).sum()) for m in masks[0.9].values())
    assert 0 < kept < sum(int((m > 0).sum()) for m in masks[0.5].values())
    for scan_id, m in masks[0.9].items():
        assert not ((m > 0) & (masks[0.5][scan_id] == 0)).any()  # only voxels the 0.5 rule calls calcium
    from calcjax.inference.predictor import Predictor

    strict = Predictor.from_checkpoint(cohort["run"], min_calcium_probability=0.9)
    given = str(tmp_path / "given")
    shards = cohort["shards"] + "/test-*"
    _score(checkpoint_path=cohort["run"], out=given, shards=shards, calcium_probability=0.9, predictor=strict)
    assert _stable(_rows(given)) == _stable(rows[0.9])
    with pytest.raises(ValueError, match="the predictor given calls calcium above 0.9"):
        _score(checkpoint_path=cohort["run"], out=str(tmp_path / "mismatch"), shards=shards, predictor=strict)
    with pytest.raises(ValueError, match="calcium_probability must lie in"):
        _score(
            checkpoint_path=cohort["run"],
            out=str(tmp_path / "bad"),
            shards=cohort["shards"],
            calcium_probability=1.0,
        )


@pytest.mark.slow
def test_resume_after_sigkill_completes_without_duplicates(cohort, tmp_path):
    whole = str(tmp_path / "whole")
    _score(checkpoint_path=cohort["run"], out=whole, shards=cohort["shards"] + "/test-*")
    out = str(tmp_path / "killed")
    args = _cli(
        "--shards",
        cohort["shards"] + "/test-*",
        "--checkpoint",
        cohort["run"],
        "--out",
        out,
        "--num_bootstrap",
        "50",
    )
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scores = os.path.join(out, "scores.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(scores) and open(scores).read().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = open(scores).read().count("\n")
    assert 1 <= killed_after < 4, "the kill must land mid-run for this test to mean anything"
    # Without --resume an OUT with scores is refused; with it, the run completes.
    refused = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    done = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{killed_after} already scored" in done.stdout
    rows = _rows(out)
    assert len(rows) == 4 and len({r["scan_id"] for r in rows}) == 4
    assert _stable(rows) == _stable(_rows(whole))


@pytest.mark.slow
def test_eight_devices_give_the_same_scores_as_one(cohort, tmp_path):
    out1, out8 = str(tmp_path / "one"), str(tmp_path / "eight")
    one, eight = (dict(os.environ, XLA_FLAGS=xla_flags(devices=n)) for n in (1, 8))
    for out, extra_env in ((out1, one), (out8, eight)):
        p = subprocess.run(
            _cli(
                "--shards",
                cohort["shards"] + "/test-*",
                "--checkpoint",
                cohort["run"],
                "--out",
                out,
                "--num_bootstrap",
                "50",
            ),
            cwd=ROOT,
            env=extra_env,
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr[-2000:]
    assert "on 8 device(s)" in p.stdout
    assert _stable(_rows(out1)) == _stable(_rows(out8))


def test_report_figures_equal_calcjax_metrics(cohort, tmp_path):
    from calcjax.core import metrics
    from calcjax.data import scan_sources

    out = str(tmp_path / "out")
    s = _score(checkpoint_path=cohort["run"], out=out, shards=cohort["shards"] + "/test-*", save_masks=True)
    assert s["report"] == os.path.join(out, "report.md")
    # Independent route to the same figures: masks from disk, references from the shards.
    scans, readers = scan_sources.shard_scans(cohort["shards"] + "/test-*", context=1)
    summaries = []
    try:
        for scan in scans:
            loaded = scan.load()
            pred = np.asarray(nib.load(os.path.join(out, "masks", f"{scan.scan_id}.nii.gz")).dataobj)
            pred = pred.transpose(2, 1, 0)
            summaries.append(
                metrics.summarize_scan(
                    scan.scan_id, loaded.meta["protocol"], pred, loaded.labels, loaded.hu, loaded.grid.spacing
                )
            )
    finally:
        readers.close()
    expected = metrics.evaluate(summaries, num_bootstrap=50)
    with open(os.path.join(out, "report.json")) as f:
        got = json.load(f)["results"]
    assert set(got) == set(expected) == {"all", "cardiac", "chest"}
    for group in expected:
        for name, fig in expected[group]["figures"].items():
            for k in ("value", "ci_low", "ci_high"):
                np.testing.assert_allclose(got[group]["figures"][name][k], fig[k], rtol=1e-12, equal_nan=True)
        assert got[group]["risk_confusion"] == expected[group]["risk_confusion"]
    report = open(os.path.join(out, "report.md")).read()
    f1 = expected["all"]["figures"]["voxel_f1"]
    assert f"| Voxel F1 | {f1['value']:.3f} ({f1['ci_low']:.3f} to {f1['ci_high']:.3f})" in report
    for png in ("bland_altman.png", "risk_confusion.png"):
        with open(os.path.join(out, "figures", png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class _PeakPredictor:
    """Stands in for ``calcjax.inference.predictor.Predictor``: calls LAD only each slice's brightest voxel if
    it is >= 130 HU, so a lesion's core is found and its footprint is not (what completion is for)."""

    in_channels, forward_seconds = 3, 0.0
    mesh = type("Mesh", (), {"size": 1})()

    def predict(self, hu, spacing=None):
        peak = hu.reshape(len(hu), -1).max(axis=1)[:, None, None]
        return ((hu == peak) & (hu >= 130)).astype(np.uint8) * 2


def test_lesion_completion_only_adds_calcium_and_is_part_of_the_run_record(cohort, tmp_path):
    """``lesion_completion_mm2``: each predicted lesion completed to its >= 130 HU component. It can only add
    calcium (a lesion's area and peak grow, merged lesions score at least their parts), it is recorded in
    run.json so a resume with another setting is refused, and a negative value is refused."""
    from calcjax.io import outputs

    shards = cohort["shards"] + "/test-*"
    kw = dict(
        checkpoint_path=cohort["run"], shards=shards, predictor=_PeakPredictor(), use_heart_region=False
    )
    off, on = str(tmp_path / "off"), str(tmp_path / "on")
    _score(out=off, **kw)
    _score(out=on, lesion_completion_mm2=1e6, **kw)
    rows_off, rows_on = _stable(_rows(off)), _stable(_rows(on))
    assert rows_off.keys() == rows_on.keys()
    for scan_id, a in rows_off.items():
        b = rows_on[scan_id]
        assert b["agatston"] >= a["agatston"] - 1e-9 and b["volume_mm3"] >= a["volume_mm3"] - 1e-9
        assert b["reference_agatston"] == a["reference_agatston"]
    grew = [k for k in rows_off if rows_on[k]["volume_mm3"] > 2 * rows_off[k]["volume_mm3"] > 0]
    assert len(grew) >= 2, (rows_off, rows_on)  # single voxels became whole lesions
    with open(os.path.join(on, "run.json")) as f:
        assert json.load(f)["lesion_completion_mm2"] == 1e6
    with open(os.path.join(off, "run.json")) as f:
        assert "lesion_completion_mm2" not in json.load(f)  # folders scored before the key still resume
    with pytest.raises(outputs.RunRecordError):
        _score(out=on, resume=True, lesion_completion_mm2=20.0, **kw)
    with pytest.raises(ValueError, match="lesion_completion_mm2"):
        _score(out=str(tmp_path / "bad"), lesion_completion_mm2=-1.0, **kw)
