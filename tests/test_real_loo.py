"""``calcjax.research.real_loo``: a plan written beforehand, each held-out scan scored by runs that never
trained on it, results kept per run (a rerun trains nothing twice, another plan is refused), and a summary
with the seed spread. Small phantom stand-ins for the real folders keep it to two short runs."""

from __future__ import annotations

import json
import os

import pytest

from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    """Two one-scan shard folders laid out as make real-shards lays them out (64x64 phantoms)."""
    base = tmp_path_factory.mktemp("loo")
    for k in (1, 2):
        src = base / f"in-{k}"
        write_scan(generate_scan(31, k, "cardiac", size=64, target_category=3), str(src), seed=31, index=k)
        builder.build(builder.BuildOptions(str(src), str(base / "real" / f"gated-{k}"), split="train=1",
                                           salt="loo-test-salt-0", progress=False))  # fmt: skip
    return str(base / "real")


def _plan(path, steps=2, completion=False):
    plan = {
        "rule": "highest mean gated voxel F1 over folds and seeds",
        "candidates": {
            "tiny": {
                "config": "configs/smoke.py",
                "real_weight": 1.0,
                "which": "latest",
                "overrides": {
                    "train.steps": steps,
                    "train.batch_size": 4,
                    "train.checkpoint_every": steps,
                    "train.eval_every": 1000,
                    "train.log_every": 1,
                    "data.crop": 32,
                },
            }  # fmt: skip
        },
    }
    if completion:  # the same training, scored with another rule: one training run serves both
        plan["candidates"]["tiny_completion"] = {
            **plan["candidates"]["tiny"],
            "score": {"lesion_completion_mm2": 40},
        }
    path.write_text(json.dumps(plan))
    return str(path)


def test_the_sources_of_a_fold_leave_out_the_held_out_scan(real_shards):
    from calcjax.research import real_loo

    assert real_loo.folds(real_shards) == ["gated-1", "gated-2"]
    spec = real_loo.sources_spec({"phantom": "P:0.5", "real_weight": 0.5}, real_shards, "gated-1")
    assert spec == f"phantom:P:0.5,gated_2:{os.path.join(real_shards, 'gated-2')}:0.5"


def test_a_fold_leaves_out_the_held_out_scans_variants_and_a_candidate_names_the_others(
    real_shards, tmp_path
):
    from calcjax.research import real_loo

    real = tmp_path / "real"
    real.mkdir()
    for k in (1, 2):
        os.symlink(os.path.join(real_shards, f"gated-{k}"), real / f"gated-{k}")
        src = os.path.join(os.path.dirname(real_shards), f"in-{k}")
        options = builder.BuildOptions(src, str(real / f"gated-{k}-thick5"), split="train=1", reslice_mm=5.0,
                                       salt="loo-test-salt-0", progress=False)  # fmt: skip
        builder.build(options)
    assert real_loo.folds(str(real)) == ["gated-1", "gated-2"]
    plain = real_loo.sources_spec({"real_weight": 1.0}, str(real), "gated-1")
    assert plain == f"gated_2:{real / 'gated-2'}:1"
    spec = real_loo.sources_spec({"real_weight": 1.0, "real_variants": ["thick5"]}, str(real), "gated-1")
    assert spec == f"gated_2:{real / 'gated-2'}:0.5,gated_2_thick5:{real / 'gated-2-thick5'}:0.5"
    manifest = json.loads((real / "gated-2-thick5" / "manifest.json").read_text())
    assert manifest["settings"]["reslice_mm"] == 5.0 and manifest["scans"][0]["spacing"][0] == 5.0


@pytest.mark.slow
def test_every_held_out_scan_is_scored_by_runs_that_never_saw_it(real_shards, tmp_path, monkeypatch):
    from calcjax.research import real_loo

    out = str(tmp_path / "loo")
    trained = []
    real_train = real_loo.train
    monkeypatch.setattr(
        real_loo, "train", lambda c, spec, seed, w: trained.append(w) or real_train(c, spec, seed, w)
    )
    real_loo.main(["--plan", _plan(tmp_path / "plan.json", completion=True), "--real_shards", real_shards,
                   "--out", out, "--seeds", "0"])  # fmt: skip
    with open(os.path.join(out, "results.jsonl")) as f:
        both = [json.loads(line) for line in f]
    assert [(r["candidate"], r["held_out"]) for r in both] == [
        ("tiny", "gated-1"),
        ("tiny", "gated-2"),
        ("tiny_completion", "gated-1"),
        ("tiny_completion", "gated-2"),
    ]
    assert [os.path.relpath(w, out) for w in trained] == [os.path.join("runs", "tiny", f, "seed-0")
                                                          for f in ("gated-1", "gated-2")]  # fmt: skip
    assert os.path.isfile(
        os.path.join(out, "runs", "tiny_completion", "gated-1", "seed-0", "score", "scores.jsonl")
    )
    rows = [r for r in both if r["candidate"] == "tiny"]
    for r in rows:
        assert 0.0 <= r["voxel_f1"] <= 1.0 and r["reference_agatston"] > 0
        with open(os.path.join(out, "runs", "tiny", r["held_out"], "seed-0", "config.json")) as f:
            sources = json.load(f)["data"]["sources"]
        assert r["held_out"] not in sources and "gated-" in sources  # trained on the other scan only
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)["tiny"]
    assert summary["gated_voxel_f1"] == pytest.approx(sum(r["voxel_f1"] for r in rows) / 2, abs=1e-4)
    assert "Rule (written before the first run)" in open(os.path.join(out, "summary.md")).read()

    def no_training(*args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(real_loo, "train", no_training)
    os.remove(os.path.join(out, "results.jsonl"))  # rows lost, finished runs kept: scored, not trained
    real_loo.main(["--plan", str(tmp_path / "plan.json"), "--real_shards", real_shards, "--out", out,
                   "--seeds", "0"])  # fmt: skip
    assert len(open(os.path.join(out, "results.jsonl")).readlines()) == 4
    with pytest.raises(SystemExit) as stop:  # another plan in the same folder: one line, exit 2
        real_loo.main(["--plan", _plan(tmp_path / "other.json", steps=3), "--real_shards", real_shards,
                       "--out", out])  # fmt: skip
    assert stop.value.code == 2


def test_a_plan_names_only_the_scorers_rules(tmp_path):
    from calcjax.research import real_loo

    plan = json.loads(open(_plan(tmp_path / "p.json")).read())
    os.makedirs(tmp_path / "out-ok")
    os.makedirs(tmp_path / "out-bad")
    plan["candidates"]["tiny"]["score"] = {"lesion_completion_mm2": 40, "use_heart_region": True}
    (tmp_path / "ok.json").write_text(json.dumps(plan))
    assert real_loo.load_plan(str(tmp_path / "ok.json"), str(tmp_path / "out-ok"))["candidates"]["tiny"][
        "score"
    ]
    plan["candidates"]["tiny"]["score"] = {"out": "/elsewhere"}
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    with pytest.raises(real_loo.PlanError, match=r"\['out'\] are not scorer rules"):
        real_loo.load_plan(str(tmp_path / "bad.json"), str(tmp_path / "out-bad"))
