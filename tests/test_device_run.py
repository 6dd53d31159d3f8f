"""bench/device_run.py's staging, on CPU with the smoke config and a budget of 120 s: every stage writes
its figure line before the next starts, in the order that puts the compilation first, and no stage runs
past the budget (what does not fit is cut, the lines before it kept)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["machine", "preflight", "compile", "train_step_one_device", "score", "data", "input_pipeline",
         "score_pipeline", "train_plan", "train", "export", "score_test_split"]  # fmt: skip


def _stage(bench: str) -> str:
    """The stage a figure line belongs to (bench/score.py's lines are the ``score`` stage's)."""
    if bench.startswith("score_pipeline"):
        return "score_pipeline"
    return "score" if bench.startswith("score") and bench != "score_test_split" else bench


@pytest.mark.slow
def test_device_run_stages_in_order_within_its_budget(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/device_run.py", "--out", str(out), "--config", "smoke", "--size", "128",
           "--scans", "10", "--workers", "1", "--budget_s", "120", "--torch_variants", "eager",
           "--compile_s", "150", "--gpu_step_s", "150", "--score_s", "100", "--reserve_s", "60",
           "--work", str(tmp_path / "work")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "session.jsonl")]
    stages = []
    for r in rows:
        name = _stage(r["bench"])
        if not stages or stages[-1] != name:
            stages.append(name)
    assert [s for s in stages if s in ORDER] == [s for s in ORDER if s in stages], stages
    assert {"machine", "preflight", "compile"} <= set(stages), stages
    times = [r["t_s"] for r in rows]
    assert times == sorted(times) and times[-1] <= 120 + 15
    compile_row = next(r for r in rows if r["bench"] == "compile")
    assert compile_row["autotune_level"] == "0"
    if "compile_s" in compile_row:  # the compile stage fitted in the budget
        assert compile_row["compile_s"] > compile_row["cached_s"] > 0
    exported = [r for r in rows if r["bench"] == "export"]
    if exported and exported[0]["ok"]:
        assert os.path.isfile(out / "calcjax-smoke-phantom-device.msgpack")
