"""A cohort of 50 scans: ``calcjax.score``'s peak memory does not grow with the number of scans (they
stream through one at a time; nothing per scan is kept but its row), and a scorer killed at random
moments and resumed each time ends with the rows of an uninterrupted run, each once."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bench.memory import peak_rss_mib
from data_prep.phantom.generator import generate_scan, write_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """50 cardiac phantoms of one size (64x64, 40-50 slices) and the first 10 of them in another folder."""
    base = tmp_path_factory.mktemp("cohort")
    fifty, ten = base / "fifty", base / "ten"
    for i in range(50):
        folder = write_scan(generate_scan(31, i, "cardiac", size=64, target_category=2), str(fifty), seed=31,
                            index=i)  # fmt: skip
        if i < 10:
            shutil.copytree(folder, ten / os.path.basename(folder))
    (base / "salt.txt").write_text("cohort-scale-test-salt")
    return base


def _score_cmd(cohort, folder: str, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "calcjax.score", f"--dicom={cohort / folder}", f"--out={out}",
            f"--salt_file={cohort / 'salt.txt'}", "--num_bootstrap=0", *extra]  # fmt: skip


@pytest.mark.slow
def test_50_scans_peak_at_the_memory_of_10_and_a_scorer_killed_five_times_ends_as_an_uninterrupted_run(
    cohort, tmp_path
):
    """The uninterrupted 50-scan run needs at most 1.2x the peak memory of a run over 10 of them
    (2026-12-06 on the development machine: 696 against 694 MiB); then the same 50 scored by a scorer
    killed at five random moments and resumed each time."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    peaks = {"ten": peak_rss_mib(_score_cmd(cohort, "ten", tmp_path / "ten")),
             "fifty": peak_rss_mib(_score_cmd(cohort, "fifty", whole))}  # fmt: skip
    assert peaks["fifty"] <= 1.2 * peaks["ten"], peaks
    expected = _rows(whole)
    rng = random.Random(7)
    for _ in range(5):  # each run killed once it has scored 2-8 more scans, at a random moment of a scan
        proc = subprocess.Popen(_score_cmd(cohort, "fifty", cut, "--resume"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        target, deadline = _lines(cut) + rng.randint(2, 8), time.time() + 120
        while time.time() < deadline and proc.poll() is None and _lines(cut) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the scorer finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _lines(cut) < 50
    subprocess.run(_score_cmd(cohort, "fifty", cut, "--resume"), cwd=ROOT, check=True, capture_output=True)
    rows = _rows(cut)
    assert len(rows) == 50 and _lines(cut) == 50  # each scan once
    assert rows == expected  # the same numbers
    assert len((cut / "scores.csv").read_text().splitlines()) == 51


def _lines(out) -> int:
    path = out / "scores.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _rows(out) -> dict:
    """{scan id: (agatston, risk category, calcium volume)} of an output folder's whole rows."""
    path = out / "scores.jsonl"
    rows = {}
    for line in path.read_bytes().splitlines(keepends=True) if path.exists() else []:
        if line.endswith(b"\n"):
            r = json.loads(line)
            rows[r["scan_id"]] = (r["agatston"], r["risk_category"], r.get("volume_mm3"))
    return rows
