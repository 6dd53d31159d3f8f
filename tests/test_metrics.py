"""calcjax.core.metrics against hand-computed values, published examples and scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from calcjax.core import metrics

# Shrout & Fleiss (1979), Psychol Bull 86:420, Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float
)


def icc_2_1_textbook(y):
    """ICC(2,1) from the two-way ANOVA mean squares, with loops (Shrout & Fleiss 1979, case 2)."""
    n, k = y.shape
    grand = sum(sum(row) for row in y) / (n * k)
    row_means = [sum(y[i]) / k for i in range(n)]
    col_means = [sum(y[i][j] for i in range(n)) / n for j in range(k)]
    bms = k * sum((m - grand) ** 2 for m in row_means) / (n - 1)
    jms = n * sum((m - grand) ** 2 for m in col_means) / (k - 1)
    ems = sum((y[i][j] - row_means[i] - col_means[j] + grand) ** 2 for i in range(n) for j in range(k)) / (
        (n - 1) * (k - 1)
    )
    return (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n)


def test_icc_matches_the_published_worked_example():
    assert icc_2_1_textbook(SHROUT_FLEISS) == pytest.approx(0.29, abs=0.005)
    assert float(metrics.icc_2_1(SHROUT_FLEISS)) == pytest.approx(0.29, abs=0.005)


def test_icc_agrees_with_the_textbook_formula_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        truth = rng.gamma(1.0, 200.0, n)
        y = np.stack([truth, truth * rng.uniform(0.7, 1.3) + rng.normal(0, 30, n)], axis=1)
        assert float(metrics.icc_2_1(y)) == pytest.approx(icc_2_1_textbook(y), rel=1e-10, abs=1e-12)
    # Batched leading axes give the same as one at a time.
    ys = rng.normal(size=(5, 10, 2))
    np.testing.assert_allclose(metrics.icc_2_1(ys), [icc_2_1_textbook(y) for y in ys])
    assert float(metrics.icc_2_1(np.array([[3.0, 3.0], [5.0, 5.0]]))) == pytest.approx(1.0)


def test_weighted_kappa_agrees_with_scikit_learn():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(2, 60))
        ref = rng.integers(0, 5, n)
        pred = np.clip(ref + rng.integers(-2, 3, n) * (rng.uniform(size=n) < 0.5), 0, 4)
        ours = float(metrics.weighted_kappa(metrics.confusion_matrix(ref, pred)))
        theirs = cohen_kappa_score(ref, pred, labels=[0, 1, 2, 3, 4], weights="linear")
        if np.isnan(theirs):
            continue
        assert ours == pytest.approx(theirs, abs=1e-12)
    # One category everywhere, in full agreement: kappa 1 (scikit-learn returns NaN here).
    assert float(metrics.weighted_kappa(metrics.confusion_matrix([2, 2, 2], [2, 2, 2]))) == 1.0


def test_confusion_rows_are_reference():
    c = metrics.confusion_matrix([0, 1, 4], [1, 1, 3])
    assert c[0, 1] == 1 and c[1, 1] == 1 and c[4, 3] == 1 and c.sum() == 3


def test_bland_altman_by_hand():
    ba = metrics.bland_altman([10.0, 20.0, 33.0], [12.0, 18.0, 30.0])  # differences -2, 2, 3
    assert ba["mean_difference"] == pytest.approx(1.0)
    sd = np.sqrt(((-3) ** 2 + 1**2 + 2**2) / 2)
    assert ba["lower_limit"] == pytest.approx(1 - 1.96 * sd) and ba["upper_limit"] == pytest.approx(
        1 + 1.96 * sd
    )


def test_voxel_counts_and_zero_division_conventions():
    ref = np.zeros((2, 4, 4), np.uint8)
    ref[0, 1:3, 1:3] = 2
    pred = np.zeros_like(ref)
    assert metrics.voxel_counts(pred, ref) == (0, 0, 4)
    assert float(metrics.f1_from_counts(0, 0, 4)) == 0.0  # all-zero prediction: F1 defined, 0
    assert float(metrics.f1_from_counts(0, 0, 0)) == 1.0  # nothing to find, nothing claimed
    pred[0, 1, 1:4] = 2
    assert metrics.voxel_counts(pred, ref) == (2, 1, 2)
    assert float(metrics.f1_from_counts(2, 1, 2)) == pytest.approx(4 / 7)


def test_lesion_counts_use_six_connectivity():
    ref = np.zeros((3, 10, 10), bool)
    ref[1, 2, 2] = ref[1, 3, 3] = True  # diagonal: two 6-connected lesions
    ref[1, 7:9, 7:9] = True  # a third lesion
    pred = np.zeros_like(ref)
    pred[1, 2, 2] = True  # hits lesion 1
    pred[0, 5, 5] = True  # false positive
    pred[2, 8, 8] = pred[1, 8, 8] = True  # one predicted lesion (z-connected) touching lesion 3
    c = metrics.lesion_counts(pred, ref)
    assert c == {"ref_lesions": 3, "detected_lesions": 2, "pred_lesions": 3, "fp_lesions": 1}


def test_lesion_centres_are_the_centroids_of_six_connected_lesions():
    labels = np.zeros((3, 10, 10), np.uint8)
    labels[1, 2, 2] = 1
    labels[1, 3, 3] = 2  # diagonal to the first: its own lesion
    labels[0:2, 7, 7:9] = 4  # one lesion over two slices, whatever its artery
    # label order is raster order (z, then y, then x) of each lesion's first voxel
    np.testing.assert_allclose(metrics.lesion_centres(labels), [[0.5, 7, 7.5], [1, 2, 2], [1, 3, 3]])
    assert metrics.lesion_centres(np.zeros((2, 4, 4), np.uint8)).shape == (0, 3)


def summary(scan_id, protocol, tp, fp, fn, a_pred, a_ref, c_pred, c_ref, lesions=(1, 1, 1, 0)):
    return metrics.ScanSummary(
        scan_id,
        protocol,
        tp,
        fp,
        fn,
        (tp, 0, 0, 0),
        (fp, 0, 0, 0),
        (fn, 0, 0, 0),
        *lesions,
        agatston_pred=a_pred,
        agatston_ref=a_ref,
        category_pred=c_pred,
        category_ref=c_ref,
    )


def test_evaluate_pools_counts_and_splits_by_protocol():
    s = [
        summary("a", "chest", 8, 2, 0, 120.0, 100.0, 3, 2),
        summary("b", "cardiac", 5, 0, 5, 5.0, 12.0, 1, 2),
        summary("c", "cardiac", 0, 0, 0, 0.0, 0.0, 0, 0, lesions=(0, 0, 0, 0)),
    ]
    r = metrics.evaluate(s, num_bootstrap=200, seed=3)
    assert set(r) == {"all", "chest", "cardiac"}
    f = r["all"]["figures"]
    assert f["voxel_f1"]["value"] == pytest.approx(2 * 13 / (2 * 13 + 2 + 5))
    assert f["risk_accuracy"]["value"] == pytest.approx(1 / 3)
    assert f["fp_lesions_per_scan"]["value"] == 0.0
    assert f["agatston_icc"]["value"] == pytest.approx(float(metrics.icc_2_1([[120, 100], [5, 12], [0, 0]])))
    assert r["cardiac"]["figures"]["voxel_f1"]["value"] == pytest.approx(10 / 15)
    assert r["all"]["risk_confusion"][2][3] == 1 and r["all"]["risk_confusion"][2][1] == 1
    for fig in f.values():
        assert fig["ci_low"] <= fig["value"] + 1e-12 <= fig["ci_high"] + 2e-12 or np.isnan(fig["ci_low"])
    # Seeded: the same seed gives the same intervals; another seed gives other ones.
    again = metrics.evaluate(s, num_bootstrap=200, seed=3)
    assert again["all"]["figures"]["voxel_f1"] == f["voxel_f1"]


def test_artery_aware_voxel_f1_counts_a_voxel_of_the_wrong_artery_as_an_error():
    hu = np.full((1, 8, 8), 400, np.int16)
    ref = np.zeros((1, 8, 8), np.uint8)
    ref[0, 1:3, 1:3] = 2  # 4 LAD voxels
    ref[0, 5:7, 5:7] = 4  # 4 RCA voxels
    pred = ref.copy()
    pred[0, 5:7, 5:7] = 2  # the RCA lesion found but called LAD
    s = metrics.summarize_scan("a", "cardiac", pred, ref, hu, (3.0, 0.5, 0.5))
    f = metrics.evaluate([s], num_bootstrap=0)["all"]["figures"]
    assert f["voxel_f1"]["value"] == 1.0  # artery-blind: every calcium voxel found
    # artery-aware: 4 right (LAD), 4 LAD false positives, 4 RCA misses -> 8 / (8 + 4 + 4)
    assert f["voxel_f1_artery"]["value"] == pytest.approx(0.5)
    assert f["voxel_f1_RCA"]["value"] == 0.0 and f["voxel_f1_LAD"]["value"] == pytest.approx(8 / 12)


def test_single_scan_gives_figures_and_says_there_is_no_interval():
    r = metrics.evaluate([summary("a", "chest", 8, 2, 0, 120.0, 100.0, 3, 2)])
    assert r["all"]["num_scans"] == 1 and "need at least 2" in r["all"]["ci_note"]
    f = r["all"]["figures"]
    assert f["voxel_f1"]["value"] == pytest.approx(16 / 18) and np.isnan(f["voxel_f1"]["ci_low"])
    assert np.isnan(f["agatston_icc"]["value"])


def test_summarize_scan_on_phantoms(phantom_dir):
    summaries = []
    for scan, _ in phantom_dir.values():
        ref = scan.label
        s = metrics.summarize_scan(scan.name, scan.acquisition.protocol, ref, ref, scan.hu, scan.grid.spacing)
        assert s.voxel_fp == s.voxel_fn == 0 and s.voxel_tp == int((ref > 0).sum())
        assert s.agatston_pred == s.agatston_ref == scan.truth["reference"]["agatston"]
        summaries.append(s)
        empty = metrics.summarize_scan("e", "chest", np.zeros_like(ref), ref, scan.hu, scan.grid.spacing)
        assert empty.voxel_tp == 0 and empty.category_pred == 0 and empty.detected_lesions == 0
    r = metrics.evaluate(summaries, num_bootstrap=100)
    for name in ("voxel_f1", "lesion_f1", "risk_accuracy", "risk_kappa", "agatston_icc"):
        assert r["all"]["figures"][name]["value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        metrics.summarize_scan("x", "chest", ref[:-1], ref, scan.hu, scan.grid.spacing)


def test_one_calcium_definition_per_row_at_100_kvp():
    """With the kVp-specific threshold (147 HU at 100 kVp) the row's voxel and lesion counts use the same
    candidate mask as its Agatston score, not 130 HU."""
    from calcjax.data.scan_sources import LoadedScan, ScanInput
    from calcjax.io.geometry import Grid
    from calcjax.score import rows as score_rows

    hu = np.full((3, 20, 20), -100, np.int16)
    lab = np.zeros(hu.shape, np.uint8)
    hu[1, 2:5, 2:5], lab[1, 2:5, 2:5] = 140, 2  # calcium at 130 HU, not at 147 HU
    hu[1, 10:13, 10:13], lab[1, 10:13, 10:13] = 300, 2
    grid = Grid(hu.shape, (3.0, 0.5, 0.5), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    missed_faint = lab.copy()
    missed_faint[1, 2:5, 2:5] = 0
    rows = {}
    for kvp in (100.0, 120.0):
        loaded = LoadedScan(hu, lab, grid, {"kvp": kvp, "protocol": "cardiac"})
        scan = ScanInput("scan-kvp", "dicom", lambda loaded=loaded: loaded)
        rows[kvp] = score_rows.score_row(scan, loaded, missed_faint, kvp_specific_threshold=True)
    at100, at120 = rows[100.0], rows[120.0]
    assert at100["threshold_hu"] == 147.0 and at120["threshold_hu"] == 130.0
    assert at100["agatston"] == at100["reference_agatston"] > 0  # the faint blob is no calcium at 147 HU
    assert at100["evaluation"]["voxel_tp"] == 9 and at100["evaluation"]["voxel_fn"] == 0
    assert at100["evaluation"]["ref_lesions"] == 1 and at100["evaluation"]["detected_lesions"] == 1
    assert at120["evaluation"]["voxel_fn"] == 9 and at120["evaluation"]["ref_lesions"] == 2
    # The summary's own scoring gives the same counts as the row's two Agatston results.
    s = metrics.summarize_scan(
        "x", "cardiac", missed_faint, lab, hu, grid.spacing, kvp=100, kvp_specific_threshold=True
    )
    assert s.counts() == at100["evaluation"]


def test_scan_summary_round_trips():
    s = metrics.ScanSummary(
        "s", "chest", 3, 1, 2, (1, 2, 0, 0), (0, 1, 0, 0), (2, 0, 0, 0), 4, 3, 5, 2, 12.5, 30.0, 2, 2
    )
    assert metrics.ScanSummary.from_counts(json.loads(json.dumps(s.counts())), "s", "chest") == s
    v = s.to_vector()
    assert v.shape == (metrics.VECTOR_SIZE,) and metrics.ScanSummary.from_vector(v, "s", "chest") == s


def test_bootstrap_ci_equals_scipy_percentile_bootstrap_within_monte_carlo_error():
    from scipy import stats

    rng = np.random.default_rng(5)
    n = 12
    tp = rng.integers(0, 200, n)
    fp = rng.integers(0, 80, n)
    fn = rng.integers(0, 80, n)
    summaries = [
        metrics.ScanSummary(
            f"s{i}",
            "cardiac",
            int(tp[i]),
            int(fp[i]),
            int(fn[i]),
            (0,) * 4,
            (0,) * 4,
            (0,) * 4,
            1,
            1,
            1,
            0,
            float(tp[i]),
            float(tp[i] + fn[i]),
            1,
            1,
        )
        for i in range(n)
    ]
    ours = metrics.evaluate(summaries, num_bootstrap=20000, seed=1)["all"]["figures"]["voxel_f1"]

    def pooled_f1(t, p, f):
        return 2 * t.sum() / (2 * t.sum() + p.sum() + f.sum())

    theirs = stats.bootstrap(
        (tp, fp, fn),
        pooled_f1,
        paired=True,
        vectorized=False,
        n_resamples=20000,
        method="percentile",
        random_state=np.random.default_rng(2),
    ).confidence_interval
    assert ours["value"] == pytest.approx(pooled_f1(tp, fp, fn))
    assert ours["ci_low"] == pytest.approx(theirs.low, abs=0.006)
    assert ours["ci_high"] == pytest.approx(theirs.high, abs=0.006)
    assert ours["ci_dropped_resamples"] == 0


def test_non_finite_resamples_are_counted_not_dropped_silently():
    # Two scans with equal predicted and reference scores: any resample of one scan twice has no ICC.
    s = [
        metrics.ScanSummary(
            f"s{i}", "chest", 5, 0, 0, (5, 0, 0, 0), (0,) * 4, (0,) * 4, 1, 1, 1, 0, a, a, 1, 1
        )
        for i, a in enumerate((10.0, 50.0))
    ]
    icc = metrics.evaluate(s, num_bootstrap=400, seed=0)["all"]["figures"]["agatston_icc"]
    assert 100 < icc["ci_dropped_resamples"] < 300  # about half of the resamples repeat one scan
