"""Cohorts assembled from folder links are searched (each real folder once), and a search that finds no
scan at all is an error, in the scorer and in the shard builder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from calcjax.data import scan_sources
from calcjax.io import dicom_series, discover
from calcjax.score import cohort as score
from calcjax.score.options import ScoreOptions
from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def linked_cohort(tmp_path_factory):
    """``cohort/`` holding links to two patient folders, a second link to one of them and a link loop."""
    base = tmp_path_factory.mktemp("links")
    folders = [
        write_scan(
            generate_scan(23, i, "cardiac", size=48, target_category=2), str(base / "store"), seed=23, index=i
        )
        for i in range(2)
    ]
    cohort = base / "cohort"
    cohort.mkdir()
    for i, folder in enumerate(folders):
        os.symlink(folder, cohort / f"patient{i}")
    os.symlink(folders[0], cohort / "same-patient-again")
    os.symlink(cohort, cohort / "loop")
    return cohort


def test_folder_links_are_followed_and_each_real_folder_searched_once(linked_cohort):
    series, bad = dicom_series.find_series(str(linked_cohort))
    assert bad == [] and len(series) == 2
    scans, errors = scan_sources.dicom_scans(str(linked_cohort), context=1, salt="links-salt")
    assert len(scans) == 2 and errors == []


def test_finding_no_scan_is_an_error_for_the_scorer_and_the_builder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(discover.NoScansError, match="no CT series found under"):
        builder.build(
            builder.BuildOptions(str(empty), str(tmp_path / "shards"), split="all=1", progress=False)
        )
    with pytest.raises(discover.NoScansError, match="no CT series found under"):
        score.score_cohort(
            ScoreOptions(
                checkpoint_path=None, out=str(tmp_path / "out"), dicom_dir=str(empty), progress=False
            )
        )
    p = subprocess.run(
        [sys.executable, "-m", "data_prep.build", "--input", str(empty), "--out", str(tmp_path / "s2")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 2 and "no CT series found under" in p.stderr and "Traceback" not in p.stderr
