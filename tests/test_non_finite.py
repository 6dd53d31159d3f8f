"""No silent wrong number: a damaged rescale, a damaged checkpoint or a non-finite
forward pass is an error for that file or scan, never a score of 0; one failing scan never stops a build."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import optax
import pydicom
import pytest

from calcjax.data import scan_sources
from calcjax.inference import predictor as inference
from calcjax.io import dicom, outputs
from calcjax.model import checkpoint
from calcjax.model import network as model_lib
from calcjax.score import cohort as score
from calcjax.score.options import ScoreOptions
from calcjax.train import checkpoint as train_checkpoint
from calcjax.train import step as ts
from configs import smoke
from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "non-finite-salt"


@pytest.fixture(scope="module")
def two_scans(tmp_path_factory):
    """Two labelled 64x64 phantoms (cardiac, chest) in one input folder."""
    base = tmp_path_factory.mktemp("nonfinite")
    for i, protocol in enumerate(("cardiac", "chest")):
        write_scan(
            generate_scan(19, i, protocol, size=64, target_category=3), str(base / "in"), seed=19, index=i
        )
    return base / "in"


def _copy_with_rescale(src, dst, slope, intercept="-1024"):
    """``src`` copied to ``dst`` with one file of its first series given the rescale values."""
    shutil.copytree(src, dst)
    victim = sorted(glob.glob(os.path.join(dst, "*", "dicom", "*.dcm")))[3]
    ds = pydicom.dcmread(victim)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(victim)
    return victim


@pytest.mark.parametrize("slope", ["NaN", "inf", "1e30", "0"])
def test_damaged_rescale_is_refused_naming_the_file(two_scans, tmp_path, slope):
    victim = _copy_with_rescale(two_scans, tmp_path / "in", slope)
    folder = os.path.dirname(victim)
    with pytest.raises(dicom.RescaleError, match=r"rescale") as info:
        dicom.read_series(sorted(glob.glob(os.path.join(folder, "*.dcm"))))
    assert info.value.path == victim and info.value.kind == "bad_rescale"


def test_build_records_the_bad_scan_and_builds_the_other(two_scans, tmp_path):
    _copy_with_rescale(two_scans, tmp_path / "in", "NaN")
    out = str(tmp_path / "shards")
    m = builder.build(
        builder.BuildOptions(str(tmp_path / "in"), out, split="all=1", salt=SALT, progress=False)
    )
    assert m["num_scans"] == 1 and m["num_errors"] == 1
    (err,) = [json.loads(x) for x in open(os.path.join(out, "errors.jsonl"))]
    assert err["kind"] == "bad_rescale" and "non-finite rescale" in err["reason"]


def test_a_failure_at_any_later_stage_of_one_scan_is_its_error_line(two_scans, tmp_path, monkeypatch):
    """The reference Agatston (or anything after reading) failing on one scan: the build goes on, the
    shard holds the other scan's records only, and the manifest is written."""
    from data_prep import shards

    real = shards.scan_metadata
    calls = []

    def failing_once(job, vol, lab):
        calls.append(job.scan_id)
        if len(calls) == 1:
            raise ValueError("non-finite HU in the reference Agatston check")
        return real(job, vol, lab)

    monkeypatch.setattr(shards, "scan_metadata", failing_once)
    out = str(tmp_path / "shards")
    m = builder.build(builder.BuildOptions(str(two_scans), out, split="all=1", salt=SALT, progress=False))
    assert len(calls) == 2 and m["num_scans"] == 1 and m["num_errors"] == 1
    (err,) = [json.loads(x) for x in open(os.path.join(out, "errors.jsonl"))]
    assert err["scan_id"] == calls[0] and "non-finite HU" in err["reason"]
    (scan,) = m["scans"]
    assert scan["scan_id"] == calls[1] and scan["record_start"] == 0
    assert m["num_records"] == scan["num_records"]  # nothing of the failed scan reached the shard


def _nan_model(poison):
    config = smoke.get_config()
    model = model_lib.new_model(model_lib.ModelConfig.from_config(config.model), 0)
    return config, poison(model)


@pytest.mark.slow
def test_a_checkpoint_with_non_finite_parameters_is_refused(tmp_path, poison_first_param):
    from calcjax.train.loop import _to_dict

    config, model = _nan_model(poison_first_param)
    _, state = ts.create_state(model, optax.sgd(0.1))
    train_checkpoint.save_for_inference(str(tmp_path / "ckpt"), state, _to_dict(config))
    with pytest.raises(checkpoint.CheckpointError, match="non-finite values in params"):
        checkpoint.load_for_inference(str(tmp_path / "ckpt" / "0"))
    p = subprocess.run(
        [sys.executable, "-m", "calcjax.score", "--dicom", str(tmp_path), "--out", str(tmp_path / "o"),
         "--checkpoint", str(tmp_path / "ckpt" / "0")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 2 and "non-finite values in params" in p.stderr and "Traceback" not in p.stderr


def test_non_finite_logits_make_an_error_row_not_a_zero_score(two_scans, tmp_path, poison_first_param):
    _, model = _nan_model(poison_first_param)
    predictor = inference.Predictor(model)
    scans, _ = scan_sources.dicom_scans(str(two_scans), context=1, salt=SALT)
    with pytest.raises(inference.NonFiniteOutputError, match="non-finite logits"):
        predictor.predict(scans[0].load().hu)
    out = str(tmp_path / "out")
    s = score.score_cohort(
        ScoreOptions(checkpoint_path=None, out=out, dicom_dir=str(two_scans), progress=False),
        predictor=predictor,
    )
    assert s["scored"] == 0 and s["failed"] == 2
    assert outputs.read_jsonl(os.path.join(out, "scores.jsonl")) == []
    errors = outputs.read_jsonl(os.path.join(out, "errors.jsonl"))
    assert [e["kind"] for e in errors] == ["non_finite_logits"] * 2


@pytest.mark.parametrize("attribute", ["RescaleIntercept", "RescaleSlope"])
def test_a_missing_rescale_attribute_is_refused_never_scored(two_scans, tmp_path, attribute):
    """RescaleSlope and RescaleIntercept are Type 1 in CT images: without one, HU are undefined (a missing
    intercept would read air as +1024 HU and score every bright voxel), so the series is an error row."""
    from calcjax.score import cohort
    from calcjax.score.options import ScoreOptions

    src = tmp_path / "in"
    shutil.copytree(two_scans, src)
    victim = sorted(glob.glob(os.path.join(src, "*", "dicom", "*.dcm")))[3]
    ds = pydicom.dcmread(victim)
    delattr(ds, attribute)
    ds.save_as(victim)
    with pytest.raises(dicom.RescaleError, match=f"{attribute} is missing"):
        dicom.read_series(sorted(glob.glob(os.path.join(os.path.dirname(victim), "*.dcm"))))
    s = cohort.score_cohort(ScoreOptions(out=str(tmp_path / "out"), dicom_dir=str(src), progress=False))
    assert s["scored"] == 1 and s["failed"] == 1
    (err,) = [json.loads(x) for x in open(tmp_path / "out" / "errors.jsonl")]
    assert err["kind"] == "bad_rescale" and f"{attribute} is missing" in err["reason"]
