"""``calcjax.research.repro`` on a tiny configuration (2 seeds, a few steps, 64x64 phantoms): every figure,
the comparison of each with the seed spread, the determinism table and the verdict are written."""

from __future__ import annotations

import json
import os

import pytest

from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

TINY = [
    "train.steps=3",
    "train.batch_size=2",
    "data.crop=32",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "train.warmup_steps=1",
    "train.log_every=1",
    "data.worker_count=0",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 small phantoms built with a salt that gives every split at least one scan."""
    base = tmp_path_factory.mktemp("repro")
    for i in range(8):
        write_scan(
            generate_scan(41, i, "cardiac", size=64, target_category=2), str(base / "in"), seed=41, index=i
        )
    for k in range(20):
        out = base / f"shards-{k}"
        split = "train=0.5,val=0.25,test=0.25"
        m = builder.build(builder.BuildOptions(str(base / "in"), str(out), split=split,
                                               salt=f"repro-test-salt-{k:02d}", progress=False))  # fmt: skip
        if {"train", "val", "test"} <= set(m["splits"]):
            return str(out)
    raise AssertionError("no salt gave every split a scan")


@pytest.mark.slow
def test_the_study_writes_every_figure_and_its_verdict(shards, tmp_path):
    from calcjax.research import repro

    doc = tmp_path / "reproducibility.md"
    argv = ["--config", "configs/smoke.py", "--shards", shards, "--out", str(tmp_path / "study"),
            "--seeds", "0,1", "--margin", "0.05", "--determinism_steps", "2", "--doc", str(doc)]  # fmt: skip
    for o in TINY:
        argv += ["--override", o]
    repro.main(argv)
    study = json.load(open(tmp_path / "study" / "study.json"))
    for fw in ("jax", "torch"):
        assert set(study["per_run"][fw]) == {"0", "1"}
        for k in repro.FIGURES:
            s = study["per_framework"][fw][k]
            assert s["min"] <= s["mean"] <= s["max"]
        assert study["steps_per_s"][fw]["mean"] > 0
    assert (
        len(study["agreement"]["between_frameworks"]) == 2
        and len(study["agreement"]["between_seeds_jax"]) == 1
    )
    assert study["equivalence"]["margin"] == 0.05 and "equivalent" in study["equivalence"]["verdict"]
    d = study["determinism"]
    for key in ("jax_repeat", "torch_repeat", "jax_1_vs_2_devices"):
        assert isinstance(d[key]["bitwise_equal"], bool) and d[key]["steps"] == 2
        assert d[key]["max_relative_weight_difference"] >= 0
    first = d["first_step_1_vs_2_devices"]
    assert first["all_reduces_in_2_device_step"] > 0 and first["batch_size"] == 2
    assert first["eval_logits"]["arrays"] == 1 and first["gradients"]["arrays"] > 10
    assert first["mean_of_a_tensor"]["two_devices_equal_half_sums"]  # an all-reduce of per-device sums
    text = doc.read_text()
    assert "**Verdict:" in text and "margin +-0.05 stated before the runs" in text
    for k in repro.FIGURES:
        assert f"| {k} |" in text
    assert (
        "gap within the spread" in text and "JAX seed against JAX seed" in text and "1 against 2 CPU" in text
    )
    assert "Where 1 and 2 devices part" in text and "| BatchNorm batch statistics" in text
    assert "same risk category" in text
    assert os.path.isfile(tmp_path / "reproducibility_loss_curves.png") and "H200" in text
    assert "3 steps x 2 seeds x 2 frameworks" in text and "median of each run's log lines" in text
    doc.unlink()
    repro.main([*argv, "--doc_only"])  # the report again from study.json: the same figures, nothing trained
    again = doc.read_text()
    assert "This report was written again with `--doc_only` at commit" in again
    assert again.splitlines()[3:] == text.splitlines()[3:]


def test_the_recipes_steps_come_from_the_override_or_the_runs_config(tmp_path, capsys):
    from calcjax.research import repro

    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 1600}}))
    assert repro.recipe_steps({}, str(tmp_path)) == 1600
    assert repro.recipe_steps({"train.steps": "7"}, str(tmp_path)) == 7
    with pytest.raises(SystemExit) as exit_:
        repro.main(["--shards", str(tmp_path), "--out", str(tmp_path / "none"), "--doc_only"])
    assert exit_.value.code == 2 and "no finished study to report" in capsys.readouterr().err


def _row(scan: str, agatston: float, category: int) -> dict:
    return {"scan_id": scan, "agatston": agatston, "risk_category": category}


def test_kappa_is_undefined_where_a_scoring_puts_every_scan_in_one_category():
    from calcjax.research import repro

    constant = [_row("a", 150.0, 3), _row("b", 250.0, 3), _row("c", 350.0, 3)]
    varied = [_row("a", 5.0, 1), _row("b", 250.0, 3), _row("c", 500.0, 4)]
    one_side = repro.agreement(constant, varied)
    assert one_side["kappa"] is None and one_side["category_agreement"] == 1 / 3
    both = repro.agreement(varied, [_row("a", 8.0, 1), _row("b", 260.0, 3), _row("c", 90.0, 2)])
    assert both["kappa"] is not None and 0 < both["kappa"] < 1
    from calcjax.research.repro_report import _kappa_cell

    cell = _kappa_cell([one_side, both])
    assert "(1 of 2 pairs undefined)" in cell and _kappa_cell([one_side]) == "undefined"


def test_tree_difference_names_the_array_that_differs_most():
    import numpy as np

    from calcjax.research.device_divergence import tree_difference

    a = {"w": np.ones(3, np.float32), "b": np.full(2, 4.0, np.float32)}
    assert tree_difference(a, a)["bitwise_equal"]
    b = {"w": np.array([1, 1, 1 + 2**-20], np.float32), "b": np.array([4.0, 4.5], np.float32)}
    d = tree_difference(a, b)
    assert not d["bitwise_equal"] and d["arrays_differing"] == 2 and d["largest_relative_in"] == "['b']"
    assert d["max_abs_difference"] == 0.5 and d["max_relative_difference"] == 0.125
