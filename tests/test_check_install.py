"""Reference outputs: the shipped model on the fixed phantom set scores as
``calcjax/model/shipped/reference_scores.csv`` says, and the comparison reports a difference beyond
tolerance."""

from __future__ import annotations

import copy

from data_prep import check_install


def test_this_installation_reproduces_the_reference_outputs(tmp_path):
    got = check_install.reference_rows(str(tmp_path))
    want = check_install.read_reference()
    # Not a vacuous reference: several risk categories, and calcium on more than one scan.
    assert len(got) == len(want) == 4 and len({r["risk_category"] for r in want}) >= 3
    assert sum(r["agatston"] > 0 for r in want) >= 2
    assert check_install.differences(got, want) == []
    # The comparison is not vacuous: 3% more Agatston on one scan, or another category, is reported.
    worse = copy.deepcopy(got)
    worse[0]["agatston"] *= 1.03
    worse[1]["risk_category"] += 1
    lines = check_install.differences(worse, want)
    assert len(lines) == 2 and "agatston" in lines[0] and "risk_category" in lines[1]
    assert check_install.differences(got[:3], want)[0].startswith("scans differ")


def test_the_reference_round_trips_through_its_csv(tmp_path):
    rows = check_install.read_reference()
    path = str(tmp_path / "reference.csv")
    check_install.write_reference(rows, path)
    assert check_install.read_reference(path) == rows
