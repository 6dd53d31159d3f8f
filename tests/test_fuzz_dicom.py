"""A 100-case slice of the seeded DICOM fuzzer (``make fuzz`` runs 1,000): no traceback, every refusal
explained, no silent change, and every mutation of the catalogue drawn at least once."""

from __future__ import annotations

import json

import pytest

from bench import fuzz_dicom, fuzz_mutations


@pytest.mark.slow
def test_a_hundred_fuzzed_series_are_scored_or_refused_with_a_reason(tmp_path):
    summary = fuzz_dicom.fuzz(str(tmp_path), 100, seed=0, real=None)
    assert summary["cases"] == 102  # and the two unmutated bases
    assert summary["tracebacks"] == 0 and summary["build_exit"] == 0 and summary["score_exit"] == 0
    assert summary["unexplained"] == 0 and summary["silent_changes"] == 0, [
        (c["mutation"], c["verdict"], c["reasons"]) for c in map(json.loads, open(tmp_path / "cases.jsonl"))
        if c["verdict"] in ("unexplained", "silent_change")
    ]  # fmt: skip
    drawn = {json.loads(line)["mutation"] for line in open(tmp_path / "cases.jsonl")}
    assert {m.name for m in fuzz_mutations.MUTATIONS} <= drawn
    assert summary["refused"] > 40 and summary["scored"] > 20
