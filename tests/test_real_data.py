"""The reading path on real scanner files: the COCA sample (3 gated scans with calcium masks, 2 chest scans
without any UID and a sheet of physician scores) and the scorer's real-data evaluation.

The real data is never in the repository: these tests find it at ``$CALCJAX_REAL_DATA`` or
a ``shared/data`` folder beside the checkout, and skip (saying why) when it is absent, as on a user's machine.
"""

from __future__ import annotations

import json
import os

import pytest

from data_prep import builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("CALCJAX_REAL_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
COCA = os.path.join(REAL, "coca-sample")
SHEET = os.path.join(COCA, "deidentified_nongated", "scores.xlsx")
# Reference Agatston of the gated scans from their XML (computed independently; shared/data/README.md).
GATED_REFERENCE = (5.9, 111.6, 367.4)

needs_real = pytest.mark.skipif(
    not os.path.isdir(COCA),
    reason=f"real COCA sample not found at {COCA} (set CALCJAX_REAL_DATA to the folder holding coca-sample/)",
)


@pytest.fixture(scope="module")
def coca_shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("coca") / "shards")
    manifest = builder.build(
        builder.BuildOptions(
            COCA, out, split="all=1", salt="real-sample-test-salt", workers=2, progress=False
        )
    )
    return out, manifest


@needs_real
def test_every_real_scan_is_built_chest_without_uids_included(coca_shards):
    out, m = coca_shards
    assert m["num_scans"] == 5 and m["num_errors"] == 0
    by_protocol = {}
    for scan in m["scans"]:
        by_protocol.setdefault(scan["protocol"], []).append(scan)
    assert len(by_protocol["chest"]) == 2 and len(by_protocol["cardiac"]) == 3
    assert {s["series_grouping"] for s in by_protocol["chest"]} == {"geometry"}
    assert {s["series_grouping"] for s in by_protocol["cardiac"]} == {"uid"}
    assert sorted(s["num_slices"] for s in by_protocol["chest"]) == [61, 70]
    gated = sorted(s["reference"]["agatston"] for s in by_protocol["cardiac"])
    for got, want in zip(gated, GATED_REFERENCE, strict=True):
        # 0.5%, or the rounding of the one-decimal reference (5.9 stands for 5.85-5.95; we get 5.857).
        assert abs(got - want) <= max(0.005 * want, 0.05), (got, want)
    assert gated[1] == pytest.approx(111.6, rel=0.005) and gated[2] == pytest.approx(367.4, rel=0.005)
    # pydicom's invalid-UID warnings: one summary line per series, no UID text in any output.
    lines = [json.loads(x) for x in open(os.path.join(out, "errors.jsonl"))]
    assert len(lines) == m["num_warnings"] == 5
    assert all(e["kind"] == "reader_warnings" and "Invalid value for VR UI" in e["reason"] for e in lines)
    text = open(os.path.join(out, "errors.jsonl")).read() + open(os.path.join(out, "manifest.json")).read()
    assert "8.08513147666027414054" not in text and "2.47206188309396630305" not in text


@needs_real
def test_release_sheet_xlsx_equals_its_csv():
    from calcjax.io import reference_scores as rs

    xlsx = rs.read_reference_scores(SHEET)
    csv = rs.read_reference_scores(SHEET.replace(".xlsx", ".csv"))
    assert xlsx == csv and set(xlsx) == {"1A", "2A"}
    assert xlsx["2A"].total == 300.0 and xlsx["2A"].risk_category == 3


@needs_real
@pytest.mark.slow
def test_real_eval_scores_a_chest_scan_against_the_sheet(tmp_path):
    """``make real-eval``'s command on one real chest scan (61 slices; the build test reads both): the
    sheet, outside the scored tree, is matched below it (folder ``1`` is row ``1A``)."""
    from calcjax.score import cohort as score
    from calcjax.score.options import ScoreOptions

    tree = tmp_path / "nongated"
    src = os.path.join(COCA, "deidentified_nongated", "1", "1")
    os.makedirs(tree / "1" / "1")
    for name in os.listdir(src):  # file links: the real data stays where it is
        os.symlink(os.path.join(src, name), tree / "1" / "1" / name)
    out = str(tmp_path / "out")
    s = score.score_cohort(
        ScoreOptions(
            checkpoint_path=None,
            out=out,
            dicom_dir=str(tree),
            reference_scores_path=SHEET,  # the release's sheet: folder 1 is row 1A with no flag
            progress=False,
            num_bootstrap=50,
        )
    )
    assert s["scored"] == 1 and s["failed"] == 0 and s["sheet_rows_matched"] == 1
    (row,) = [json.loads(x) for x in open(os.path.join(out, "scores.jsonl"))]
    assert row["reference_agatston"] == 0.0 and row["reference_source"] == "sheet"
    assert row["series_grouping"] == "geometry" and row["protocol"] == "chest" and row["num_slices"] == 61
    report = open(os.path.join(out, "report.md")).read()
    assert "| Risk category accuracy |" in report and "chest (n=1)" in report
