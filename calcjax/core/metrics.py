"""Evaluation statistics of calcium scoring: voxel, lesion, Agatston agreement and risk category.

Pure numpy + scipy (no jax). The measures are the paper's (voxel F1, risk-category accuracy), the orCaScore
challenge's (lesion-level detection with 3D 6-connected lesions, ICC and Bland-Altman of Agatston; Wolterink
et al., Med Phys 2016) and what the paper's referee asked for (per-protocol figures, confidence intervals).

Conventions:
- Calcium voxels: label > 0 (any artery); per artery: label == a; artery-aware voxel F1 pools the four
  arteries' counts (a voxel of the wrong artery is one false positive and one false negative). Masks are
  restricted to the candidate voxels (``calcjax.core.agatston.candidate_mask`` at the threshold the scan's
  Agatston used) first.
- Ratios with a zero denominator are defined, never NaN: ``0/0 := 1`` for precision, recall, sensitivity
  and PPV (nothing to find, or nothing claimed, is no error) and F1 = 2 TP / (2 TP + FP + FN) with
  ``0/0 := 1``. So all-zero predictions on a scan with calcium give precision 1, recall 0, F1 0, and
  all-zero predictions on a scan without calcium give F1 1.
- Lesions: 3D 6-connected components of the reference calcium mask; a reference lesion is detected when
  any predicted calcium voxel lies in it; a predicted lesion (6-connected component of the prediction) is a
  false positive when it touches no reference calcium voxel.
- ICC(2,1): two-way random effects, absolute agreement, single rater (Shrout & Fleiss 1979; McGraw & Wong
  1996 ICC(A,1)). Bland-Altman: mean of (predicted - reference) and mean +- 1.96 SD (ddof 1).
- Risk category: accuracy, linearly weighted Cohen's kappa over the five categories 0-4 (kappa := 1 when
  both raters agree on every scan, including the case of one category only), 5x5 confusion matrix with
  rows = reference and columns = prediction.
- Confidence intervals: percentile bootstrap over scans (``num_bootstrap`` resamples, seeded), 95%;
  a test holds it to ``scipy.stats.bootstrap(method="percentile")`` within Monte-Carlo error. Percentile,
  not BCa: BCa's acceleration comes from a jackknife over the scans, which on the 3-13 scans of the
  cohorts reported here rests on as few points as the interval itself and can fail outright (a ratio
  figure undefined when one scan is left out); neither is accurate at such n, so the report says n beside
  every interval. Resamples whose figure is not finite (an ICC of identical scans) are left out of that
  figure's interval and counted (``ci_dropped_resamples``), never dropped silently.
  Fewer than two scans gives no interval and says so (``ci_note``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from calcjax.core import agatston

NUM_ARTERIES = len(agatston.ARTERIES)
NUM_CATEGORIES = len(agatston.RISK_CATEGORY_NAMES)
_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def _ratio(num, den):
    """num / den elementwise with 0/0 := 1."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def f1_from_counts(tp, fp, fn):
    """F1 = 2 TP / (2 TP + FP + FN), with 0/0 := 1 (elementwise)."""
    tp = np.asarray(tp, np.float64)
    return _ratio(2 * tp, 2 * tp + np.asarray(fp) + np.asarray(fn))


@dataclasses.dataclass(frozen=True)
class ScanSummary:
    """Per-scan counts and scores from which every cohort figure (and its bootstrap) is computed.

    Attributes:
      scan_id: pseudonymous scan id.
      protocol: ``chest`` / ``cardiac`` / ``unknown``.
      voxel_tp, voxel_fp, voxel_fn: calcium voxel counts (any artery).
      artery_tp, artery_fp, artery_fn: ``(4,)`` per artery LM, LAD, LCX, RCA.
      ref_lesions, detected_lesions: reference 3D lesions and how many of them the prediction touches.
      pred_lesions, fp_lesions: predicted 3D lesions and how many touch no reference calcium.
      agatston_pred, agatston_ref: total Agatston scores.
      category_pred, category_ref: risk categories 0-4.
    """

    scan_id: str
    protocol: str
    voxel_tp: int
    voxel_fp: int
    voxel_fn: int
    artery_tp: tuple[int, ...]
    artery_fp: tuple[int, ...]
    artery_fn: tuple[int, ...]
    ref_lesions: int
    detected_lesions: int
    pred_lesions: int
    fp_lesions: int
    agatston_pred: float
    agatston_ref: float
    category_pred: int
    category_ref: int

    def counts(self) -> dict:
        """The fields but ``scan_id`` and ``protocol`` (a score row's ``evaluation``; JSON-ready)."""
        return {f: getattr(self, f) for f in COUNT_FIELDS}

    @classmethod
    def from_counts(cls, counts: dict, scan_id: str, protocol: str) -> ScanSummary:
        """The inverse of :meth:`counts` (lists from JSON become tuples)."""
        fields = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in counts.items()}
        return cls(scan_id=scan_id, protocol=protocol, **fields)

    def to_vector(self) -> np.ndarray:
        """The counts as one float64 vector of :data:`VECTOR_SIZE` (per-artery fields expanded), for
        gathering across processes."""
        parts = []
        for name in COUNT_FIELDS:
            v = getattr(self, name)
            parts += list(v) if isinstance(v, tuple) else [v]
        return np.asarray(parts, np.float64)

    @classmethod
    def from_vector(cls, v: np.ndarray, scan_id: str, protocol: str) -> ScanSummary:
        """The inverse of :meth:`to_vector`."""
        fields, i = {}, 0
        for name in COUNT_FIELDS:
            if name.startswith("artery_"):
                fields[name] = tuple(int(x) for x in v[i : i + NUM_ARTERIES])
                i += NUM_ARTERIES
            else:
                fields[name] = float(v[i]) if name.startswith("agatston") else int(v[i])
                i += 1
        return cls(scan_id=scan_id, protocol=protocol, **fields)


COUNT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ScanSummary) if f.name not in ("scan_id", "protocol")
)
VECTOR_SIZE = sum(NUM_ARTERIES if n.startswith("artery_") else 1 for n in COUNT_FIELDS)


def summarize_scan(
    scan_id: str,
    protocol: str,
    pred: np.ndarray,
    ref: np.ndarray,
    hu: np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    *,
    pred_score: dict | None = None,
    ref_score: dict | None = None,
    **score_kwargs,
) -> ScanSummary:
    """Counts and scores of one scan; ``pred`` and ``ref``: ``(z, y, x)`` labels 0-4 on the grid of ``hu``.

    ``pred_score`` / ``ref_score``: the :func:`calcjax.core.agatston.score` results of ``pred`` and ``ref``
    when the caller has them (the scorer does), else they are computed here from ``spacing`` and
    ``score_kwargs``. Voxel and lesion counts use the candidate mask of the threshold those results used
    (``agatston.candidate_mask``), so a kVp-specific threshold applies to every figure of the row.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape or pred.shape != np.shape(hu):
        raise ValueError(
            f"{scan_id}: prediction {pred.shape}, reference {ref.shape} and HU {np.shape(hu)} differ"
        )
    if pred_score is None:
        pred_score = agatston.score(hu, pred, spacing, **score_kwargs)
    if ref_score is None:
        ref_score = agatston.score(hu, ref, spacing, **score_kwargs)
    if pred_score["threshold_hu"] != ref_score["threshold_hu"]:
        raise ValueError(
            f"{scan_id}: prediction scored at {pred_score['threshold_hu']} HU, reference at "
            f"{ref_score['threshold_hu']} HU: one calcium definition per scan"
        )
    candidate = agatston.candidate_mask(hu, pred_score["threshold_hu"])
    p = np.where(candidate, pred, 0)
    r = np.where(candidate, ref, 0)
    tp, fp, fn = voxel_counts(p, r)
    a_tp, a_fp, a_fn = zip(*(voxel_counts(p == a, r == a) for a in range(1, NUM_ARTERIES + 1)), strict=True)
    lesions = lesion_counts(p > 0, r > 0)
    return ScanSummary(
        scan_id=scan_id,
        protocol=protocol,
        voxel_tp=tp,
        voxel_fp=fp,
        voxel_fn=fn,
        artery_tp=tuple(a_tp),
        artery_fp=tuple(a_fp),
        artery_fn=tuple(a_fn),
        **lesions,
        agatston_pred=pred_score["agatston"],
        agatston_ref=ref_score["agatston"],
        category_pred=pred_score["risk_category"],
        category_ref=ref_score["risk_category"],
    )


def voxel_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) of calcium voxels: nonzero = calcium."""
    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    tp = int(np.count_nonzero(p & r))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(r)) - tp


def lesion_centres(labels: np.ndarray) -> np.ndarray:
    """Centroids ``(n, 3)`` (z, y, x in voxels, float) of the 3D 6-connected lesions of ``labels > 0``
    (``(Z, H, W)``), in raster order of each lesion's first voxel; ``(0, 3)`` when there is none."""
    comps, n = ndimage.label(np.asarray(labels) > 0, structure=_SIX_CONNECTED)
    centres = ndimage.center_of_mass(np.ones(comps.shape, np.float32), comps, range(1, n + 1))
    return np.asarray(centres, np.float64).reshape(n, 3)


def lesion_counts(pred: np.ndarray, ref: np.ndarray) -> dict[str, int]:
    """Lesion-level counts with 3D 6-connected lesions (see module docstring)."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    ref_comp, n_ref = ndimage.label(r, structure=_SIX_CONNECTED)
    pred_comp, n_pred = ndimage.label(p, structure=_SIX_CONNECTED)
    detected = np.unique(ref_comp[p & r])
    touching = np.unique(pred_comp[p & r])
    return {
        "ref_lesions": int(n_ref),
        "detected_lesions": int(np.count_nonzero(detected)),
        "pred_lesions": int(n_pred),
        "fp_lesions": int(n_pred - np.count_nonzero(touching)),
    }


def icc_2_1(ratings: np.ndarray) -> np.ndarray:
    """ICC(2,1) of ``(..., n subjects, k raters)`` ratings (leading axes are batched), absolute agreement.

    ``(MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)`` (Shrout & Fleiss 1979, case 2). NaN when
    every rating is identical (no variance to apportion).
    """
    y = np.asarray(ratings, np.float64)
    n, k = y.shape[-2], y.shape[-1]
    if n < 2 or k < 2:
        raise ValueError(f"ICC needs at least 2 subjects and 2 raters, got {n} x {k}")
    grand = y.mean(axis=(-2, -1), keepdims=True)
    rows = y.mean(axis=-1, keepdims=True)
    cols = y.mean(axis=-2, keepdims=True)
    msr = k * ((rows - grand) ** 2).sum(axis=(-2, -1)) / (n - 1)
    msc = n * ((cols - grand) ** 2).sum(axis=(-2, -1)) / (k - 1)
    mse = ((y - rows - cols + grand) ** 2).sum(axis=(-2, -1)) / ((n - 1) * (k - 1))
    den = msr + (k - 1) * mse + k * (msc - mse) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den != 0, (msr - mse) / np.where(den != 0, den, 1.0), np.nan)


def bland_altman(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Mean difference (pred - ref) and its 95% limits of agreement (mean +- 1.96 SD, ddof 1)."""
    d = np.asarray(pred, np.float64) - np.asarray(ref, np.float64)
    mean = float(d.mean()) if d.size else float("nan")
    sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
    return {
        "mean_difference": mean,
        "lower_limit": mean - 1.96 * sd,
        "upper_limit": mean + 1.96 * sd,
        "sd": sd,
    }


def confusion_matrix(ref: np.ndarray, pred: np.ndarray, num_classes: int = NUM_CATEGORIES) -> np.ndarray:
    """``(num_classes, num_classes)`` counts, rows = reference, columns = prediction."""
    ref, pred = np.asarray(ref, np.int64), np.asarray(pred, np.int64)
    return np.bincount(ref * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def weighted_kappa(confusion: np.ndarray) -> np.ndarray:
    """Linearly weighted Cohen's kappa of ``(..., K, K)`` confusion matrices (leading axes batched)."""
    c = np.asarray(confusion, np.float64)
    k = c.shape[-1]
    i, j = np.indices((k, k))
    w = np.abs(i - j) / (k - 1)
    total = c.sum(axis=(-2, -1), keepdims=True)
    expected = c.sum(axis=-1, keepdims=True) * c.sum(axis=-2, keepdims=True) / np.where(total > 0, total, 1)
    observed_dis = (w * c).sum(axis=(-2, -1))
    expected_dis = (w * expected).sum(axis=(-2, -1))
    return np.where(
        observed_dis == 0, 1.0, 1.0 - observed_dis / np.where(expected_dis > 0, expected_dis, 1.0)
    )


def _figures(s: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every cohort figure for each row of scan indices ``idx`` ``(B, n)`` -> arrays ``(B,)``."""

    def total(name):
        return s[name][idx].sum(axis=1)

    tp, fp, fn = total("voxel_tp"), total("voxel_fp"), total("voxel_fn")
    out = {
        "voxel_precision": _ratio(tp, tp + fp),
        "voxel_recall": _ratio(tp, tp + fn),
        "voxel_f1": f1_from_counts(tp, fp, fn),
    }
    a_tp, a_fp, a_fn = (s[n][idx].sum(axis=1) for n in ("artery_tp", "artery_fp", "artery_fn"))
    for a, name in enumerate(agatston.ARTERIES):
        out[f"voxel_f1_{name}"] = f1_from_counts(a_tp[:, a], a_fp[:, a], a_fn[:, a])
    # Artery-aware: the per-artery counts pooled, so a calcium voxel given the wrong artery is a false
    # positive of one artery and a false negative of another (the 5-class segmentation, artery included).
    out["voxel_f1_artery"] = f1_from_counts(a_tp.sum(axis=1), a_fp.sum(axis=1), a_fn.sum(axis=1))
    ref_l, det_l, pred_l, fp_l = (
        total("ref_lesions"),
        total("detected_lesions"),
        total("pred_lesions"),
        total("fp_lesions"),
    )
    sens, ppv = _ratio(det_l, ref_l), _ratio(pred_l - fp_l, pred_l)
    out.update(
        lesion_sensitivity=sens,
        lesion_ppv=ppv,
        lesion_f1=np.where(sens + ppv > 0, 2 * sens * ppv / np.where(sens + ppv > 0, sens + ppv, 1), 0.0),
        fp_lesions_per_scan=fp_l / idx.shape[1],
    )
    out.update(_agreement_figures(s, idx))
    return out


def _agreement_figures(s: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Agatston ICC / Bland-Altman and risk-category figures for each row of ``idx`` ``(B, n)``."""
    out = {}
    pairs = np.stack([s["agatston_pred"][idx], s["agatston_ref"][idx]], axis=-1)
    out["agatston_icc"] = icc_2_1(pairs) if idx.shape[1] >= 2 else np.full(idx.shape[0], np.nan)
    d = pairs[..., 0] - pairs[..., 1]
    out["bland_altman_mean_difference"] = d.mean(axis=1)
    sd = d.std(axis=1, ddof=1) if idx.shape[1] >= 2 else np.full(idx.shape[0], np.nan)
    out["bland_altman_lower_limit"] = out["bland_altman_mean_difference"] - 1.96 * sd
    out["bland_altman_upper_limit"] = out["bland_altman_mean_difference"] + 1.96 * sd
    cp, cr = s["category_pred"][idx], s["category_ref"][idx]
    out["risk_accuracy"] = (cp == cr).mean(axis=1)
    conf = np.zeros((idx.shape[0], NUM_CATEGORIES * NUM_CATEGORIES), np.int64)
    flat = cr * NUM_CATEGORIES + cp
    np.add.at(conf, (np.arange(idx.shape[0])[:, None], flat), 1)
    out["risk_kappa"] = weighted_kappa(conf.reshape(-1, NUM_CATEGORIES, NUM_CATEGORIES))
    return out


def evaluate(
    summaries: list[ScanSummary], *, num_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """Cohort figures with bootstrap CIs, for all scans and per protocol.

    Returns ``{group: {"num_scans", "figures": {name: {"value", "ci_low", "ci_high"}}, "ci_note",
    "risk_confusion", "bland_altman"}}`` with groups ``all`` and each protocol present.
    """
    groups = {"all": summaries}
    for protocol in sorted({s.protocol for s in summaries}):
        groups[protocol] = [s for s in summaries if s.protocol == protocol]
    return {name: _evaluate_group(group, num_bootstrap, seed, confidence) for name, group in groups.items()}


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    """Scan-level agreement inputs: a scan whose reference is a score (e.g. a physician's sheet), not a
    mask. ``agatston_*``: total Agatston; ``category_*``: risk categories 0-4."""

    scan_id: str
    protocol: str
    agatston_pred: float
    agatston_ref: float
    category_pred: int
    category_ref: int


def evaluate_scores(
    summaries: list[ScoreSummary], *, num_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """Like :func:`evaluate`, with the scan-level figures only (Agatston ICC(2,1), Bland-Altman, risk
    accuracy, weighted kappa, confusion matrix): for scans whose reference has no voxels."""
    groups = {"all": summaries}
    for protocol in sorted({s.protocol for s in summaries}):
        groups[protocol] = [s for s in summaries if s.protocol == protocol]
    return {
        name: _evaluate_group(group, num_bootstrap, seed, confidence, ScoreSummary, _agreement_figures)
        for name, group in groups.items()
    }


def _evaluate_group(
    summaries, num_bootstrap, seed, confidence, kind=ScanSummary, figures_fn=_figures
) -> dict:
    n = len(summaries)
    if n == 0:
        return {"num_scans": 0, "figures": {}, "ci_note": "no scans", "risk_confusion": None}
    fields = [f.name for f in dataclasses.fields(kind) if f.name not in ("scan_id", "protocol")]
    s = {name: np.asarray([getattr(x, name) for x in summaries]) for name in fields}
    point = {k: float(v[0]) for k, v in figures_fn(s, np.arange(n)[None]).items()}
    note = None
    if n < 2:
        note = f"no bootstrap CI from {n} scan; need at least 2"
        boot = None
    else:
        idx = np.random.default_rng(seed).integers(0, n, size=(num_bootstrap, n))
        boot = figures_fn(s, idx)
    alpha = (1.0 - confidence) / 2
    figures = {}
    for k, v in point.items():
        lo = hi = float("nan")
        dropped = 0
        if boot is not None:
            finite = boot[k][np.isfinite(boot[k])]
            dropped = int(boot[k].size - finite.size)  # e.g. an ICC of a resample with one distinct scan
            if finite.size:
                lo, hi = (float(q) for q in np.quantile(finite, [alpha, 1 - alpha]))
        figures[k] = {"value": v, "ci_low": lo, "ci_high": hi, "ci_dropped_resamples": dropped}
    return {
        "num_scans": n,
        "figures": figures,
        "ci_note": note,
        "risk_confusion": confusion_matrix(s["category_ref"], s["category_pred"]).tolist(),
        "bland_altman": bland_altman(s["agatston_pred"], s["agatston_ref"]),
    }
