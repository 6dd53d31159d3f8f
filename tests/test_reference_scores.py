"""Scan-level reference scores (sheets without masks): reading, matching, and the report they feed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from calcjax.core import metrics
from calcjax.io import reference_scores as rs
from data_prep.phantom.generator import generate_scan, write_scan


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_coca_style_sheet_total_gives_the_category_not_the_artery_sum(tmp_path):
    sheet = _write(
        tmp_path / "s.csv", "filename ,LCA,LAD,LCX,RCA,total\n1A,0,0,0,0,0\n2A,132,1.91,128,37.5,300\n"
    )
    refs = rs.read_reference_scores(sheet)
    assert set(refs) == {"1A", "2A"}
    two = refs["2A"]
    assert two.per_artery == {"LM": 132.0, "LAD": 1.91, "LCX": 128.0, "RCA": 37.5}  # LCA is the left main
    assert two.total == 300.0 and two.total_from == "total"
    assert two.artery_sum == pytest.approx(299.41)
    assert two.risk_category == 3 and refs["1A"].risk_category == 0


def test_sheet_without_total_sums_the_arteries_and_bad_cells_name_row_and_column(tmp_path):
    refs = rs.read_reference_scores(_write(tmp_path / "a.csv", "scan,LAD,RCA\nx,5,\ny,300,150\n"))
    assert (
        refs["x"].total == 5.0 and refs["x"].total_from == "arteries" and refs["x"].per_artery == {"LAD": 5}
    )
    assert refs["y"].risk_category == 4
    with pytest.raises(rs.ReferenceScoresError, match=r"row 3, column 'LAD': 'n/a' is not a number"):
        rs.read_reference_scores(_write(tmp_path / "b.csv", "scan,LAD\nx,1\ny,n/a\n"))
    with pytest.raises(rs.ReferenceScoresError, match="appears twice"):
        rs.read_reference_scores(_write(tmp_path / "c.csv", "scan,total\nx,1\nx,2\n"))
    with pytest.raises(rs.ReferenceScoresError, match="neither a total"):
        rs.read_reference_scores(_write(tmp_path / "d.csv", "scan,notes\nx,hello\n"))
    with pytest.raises(rs.ReferenceScoresError, match="no key column 'patient'"):
        rs.read_reference_scores(_write(tmp_path / "e.csv", "scan,total\nx,1\n"), key_column="patient")


def test_xlsx_reads_like_csv(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    for row in (["filename ", "LCA", "LAD", "LCX", "RCA", "total"], [2, 132, 1.91, 128, 37.5, 300]):
        sheet.append(row)
    book.save(tmp_path / "s.xlsx")
    refs = rs.read_reference_scores(str(tmp_path / "s.xlsx"))
    assert list(refs) == ["2"] and refs["2"].total == 300.0  # numeric keys read as the folder name
    with open(tmp_path / "bad.xlsx", "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(rs.ReferenceScoresError, match="bad.xlsx: not a readable .xlsx"):
        rs.read_reference_scores(str(tmp_path / "bad.xlsx"))


def test_matching_is_relative_to_the_sheet_folder_inside_the_tree(tmp_path):
    """COCA: the chest sheet lies in deidentified_nongated/; gated patient '1' must not take row '1A'."""
    root = tmp_path / "release"
    chest, gated = root / "deidentified_nongated" / "1" / "1", root / "Gated" / "patient" / "1" / "series"
    for d in (chest, gated):
        os.makedirs(d)
    sheet = _write(root / "deidentified_nongated" / "scores.csv", "filename,total\n1A,7\n")
    refs = rs.read_reference_scores(sheet)
    base = rs.match_base(sheet, str(root))
    assert base == str(root / "deidentified_nongated")
    assert rs.match(refs, scan_id="scan-a", scan_folder=str(chest), base=base, key_suffix="A").total == 7
    assert rs.match(refs, scan_id="scan-b", scan_folder=str(gated), base=base, key_suffix="A") is None
    # Without a suffix the one key that is the folder's name and a letter matches; two such keys, none.
    assert rs.match(refs, scan_id="scan-a", scan_folder=str(chest), base=base).total == 7
    assert rs.match(refs, scan_id="scan-b", scan_folder=str(gated), base=base) is None
    two = rs.read_reference_scores(_write(tmp_path / "two.csv", "filename,total\n1A,7\n1B,8\n1,5\n10A,6\n"))
    assert rs.match(two, scan_id="x", scan_folder=str(chest), base=base).total == 5  # the name itself first
    del two["1"]
    assert rs.match(two, scan_id="x", scan_folder=str(chest), base=base) is None  # 1A or 1B: neither
    # A sheet outside the tree matches the first folder below the tree; a scan id always matches.
    outside = _write(tmp_path / "elsewhere.csv", "scan,total\nGated,3\nscan-z,9\n")
    refs = rs.read_reference_scores(outside)
    base = rs.match_base(outside, str(root))
    assert base == str(root)
    assert rs.match(refs, scan_id="scan-b", scan_folder=str(gated), base=base).total == 3
    assert rs.match(refs, scan_id="scan-z", scan_folder=None, base=base).total == 9


@pytest.fixture(scope="module")
def unlabelled_cohort(tmp_path_factory):
    """Three small phantoms with their labels removed, as a chest release without masks, and a sheet."""
    base = tmp_path_factory.mktemp("sheet_cohort")
    root = base / "release"
    os.makedirs(root)
    lines = ["filename ,LCA,LAD,LCX,RCA,total"]
    for i, (protocol, total) in enumerate((("chest", 0.0), ("chest", 250.0), ("cardiac", 35.0))):
        scan = generate_scan(13, i, protocol, size=64, target_category=2)
        folder = write_scan(scan, str(base / "tmp"), seed=13, index=i)
        dst = root / f"p{i}"
        shutil.copytree(os.path.join(folder, "dicom"), dst / "series")
        lines.append(f"p{i}A,,{total / 2},,{total / 2 + 1},{total}")
    _write(root / "scores.csv", "\n".join(lines) + "\nnobodyA,,,,,12\n")
    return root


def test_score_with_a_sheet_reports_scan_level_agreement(unlabelled_cohort, tmp_path):
    from calcjax.score import cohort as score
    from calcjax.score.options import ScoreOptions

    out = str(tmp_path / "out")
    s = score.score_cohort(
        ScoreOptions(
            checkpoint_path=None,
            out=out,
            dicom_dir=str(unlabelled_cohort),
            reference_scores_path=str(unlabelled_cohort / "scores.csv"),  # p0 is row p0A, no flag
            progress=False,
            num_bootstrap=50,
        )
    )
    assert s["scored"] == 3 and s["sheet_rows"] == 4 and s["sheet_rows_matched"] == 3
    rows = [json.loads(line) for line in open(os.path.join(out, "scores.jsonl"))]
    assert {r["reference_source"] for r in rows} == {"sheet"} and not any("evaluation" in r for r in rows)
    totals = sorted(r["reference_agatston"] for r in rows)
    assert totals == [0.0, 35.0, 250.0]
    two = next(r for r in rows if r["reference_agatston"] == 250.0)
    assert two["reference_risk_category"] == 3 and two["reference_artery_sum"] == pytest.approx(251.0)
    assert two["reference_agatston_per_artery"]["LM"] is None
    expected = metrics.evaluate_scores(
        [
            metrics.ScoreSummary(
                r["scan_id"],
                r["protocol"],
                r["agatston"],
                r["reference_agatston"],
                r["risk_category"],
                r["reference_risk_category"],
            )
            for r in rows
        ],
        num_bootstrap=50,
    )
    got = json.load(open(os.path.join(out, "report.json")))
    assert got["results"] == {}  # no masks: no voxel figures
    assert set(got["scan_level"]) == {"all", "chest", "cardiac"}
    for group in expected:
        for name, fig in expected[group]["figures"].items():
            np.testing.assert_allclose(got["scan_level"][group]["figures"][name]["value"], fig["value"])
        assert got["scan_level"][group]["risk_confusion"] == expected[group]["risk_confusion"]
    report = open(os.path.join(out, "report.md")).read()
    assert "with a scan-level reference score only (sheet): 3" in report
    assert "| Risk category accuracy |" in report and "Voxel F1" not in report
    assert "per-artery figures need not add up" in report
