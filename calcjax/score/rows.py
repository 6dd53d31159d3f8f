"""What the scorer writes about one scan: its score row, its disagreement crops, its error line.

No jax here: the rows are numpy + ``calcjax.core.agatston`` / ``calcjax.core.metrics`` on the loaded scan and
the predicted labels (``calcjax.score`` runs the model).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from calcjax.core import agatston, metrics
from calcjax.data import scan_sources
from calcjax.io import reference_scores

OVERLAY_CROP = 96  # pixels: the side of the disagreement crop kept for the report's overlays


def scan_kvp(loaded: scan_sources.LoadedScan) -> float:
    """The tube voltage (kVp) a scan is scored at: its header's, else 120 (the 130 HU threshold's own)."""
    return loaded.meta.get("kvp") or 120.0


def score_row(
    scan: scan_sources.ScanInput,
    loaded: scan_sources.LoadedScan,
    pred: np.ndarray,
    reference: reference_scores.ReferenceScore | None = None,
    **kw,
) -> dict:
    """The output line of one scan (its keys are the CSV's columns, per-artery dicts flattened).

    Keys: scan_id, source, protocol, num_slices, slice_increment_mm, slice_thickness_mm, kvp,
    series_grouping (``uid``, or ``geometry`` for a series grouped without a SeriesInstanceUID), agatston,
    agatston_per_artery {LM, LAD, LCX, RCA}, volume_mm3, mass_mg (None unless ``mass_calibration``),
    risk_category (0-4), risk_category_name, num_lesions (counted 2D lesions), threshold_hu (the calcium
    threshold every figure of the row used: 130, or kVp-specific); with reference labels also
    reference_agatston, reference_agatston_per_artery, reference_volume_mm3, reference_risk_category and
    ``evaluation`` (the :class:`calcjax.core.metrics.ScanSummary` fields, from which the report's figures
    come).
    ``reference_source`` says where the reference came from: ``mask`` (labels; wins when both exist) or
    ``sheet`` (``reference``: a scan-level score; its total gives the category, ``reference_artery_sum``
    keeps the sum of its per-artery figures, which need not equal the total).
    """
    spacing = loaded.grid.spacing
    kvp = scan_kvp(loaded)
    s = agatston.score(loaded.hu, pred, spacing, kvp=kvp, **kw)
    row = {
        "scan_id": scan.scan_id,
        "source": scan.source,
        "protocol": loaded.meta.get("protocol") or "unknown",
        "num_slices": int(loaded.hu.shape[0]),
        "slice_increment_mm": float(spacing[0]),
        "slice_thickness_mm": loaded.meta.get("slice_thickness_mm"),
        "kvp": loaded.meta.get("kvp"),
        "series_grouping": loaded.meta.get("series_grouping", "uid"),
        "agatston": s["agatston"],
        "agatston_per_artery": s["agatston_per_artery"],
        "volume_mm3": s["volume_mm3"],
        "mass_mg": s["mass_mg"],
        "risk_category": s["risk_category"],
        "risk_category_name": s["risk_category_name"],
        "num_lesions": s["num_lesions"],
        "threshold_hu": s["threshold_hu"],
    }
    if loaded.labels is not None:
        r = agatston.score(loaded.hu, loaded.labels, spacing, kvp=kvp, **kw)
        row.update(
            reference_agatston=r["agatston"],
            reference_agatston_per_artery=r["agatston_per_artery"],
            reference_volume_mm3=r["volume_mm3"],
            reference_risk_category=r["risk_category"],
        )
        summary = metrics.summarize_scan(
            scan.scan_id, row["protocol"], pred, loaded.labels, loaded.hu, pred_score=s, ref_score=r
        )
        row["evaluation"] = summary.counts()
        row["reference_source"] = "mask"
    elif reference is not None:
        row.update(
            reference_agatston=reference.total,
            reference_agatston_per_artery={a: reference.per_artery.get(a) for a in agatston.ARTERIES},
            reference_risk_category=reference.risk_category,
            reference_source="sheet",
            reference_total_from=reference.total_from,
            reference_artery_sum=reference.artery_sum,
        )
    return row


DISAGREEMENT_KINDS = ("missed", "extra", "wrong artery")
_IN_PLANE_8 = np.zeros((3, 3, 3), bool)
_IN_PLANE_8[1] = True  # 8-connected within a slice, never across slices (as Agatston's lesions)


def disagreement_crops(
    loaded: scan_sources.LoadedScan, pred: np.ndarray, threshold_hu: float = agatston.CALCIUM_THRESHOLD_HU
) -> list[dict]:
    """One crop per kind of disagreement, centred on that kind's largest in-plane component.

    Kinds (candidate voxels, HU >= ``threshold_hu``): ``missed`` (reference calcium predicted background),
    ``extra`` (predicted calcium the reference calls background), ``wrong artery`` (both calcium, other
    labels). Centring on the largest component, not on the mean of all differing voxels, keeps the crop
    on something when the differences are scattered (ribs on both sides and a plaque in the middle).

    Returns ``[{"kind", "voxels" (component size), "slice", "hu", "pred", "ref"}]`` with
    ``(OVERLAY_CROP, OVERLAY_CROP)`` crops, largest component first; [] when they agree.
    """
    cand = agatston.candidate_mask(loaded.hu, threshold_hu)
    ref = np.where(cand, loaded.labels, 0)
    p = np.where(cand, pred, 0)
    masks = {
        "missed": (ref > 0) & (p == 0),
        "extra": (p > 0) & (ref == 0),
        "wrong artery": (p > 0) & (ref > 0) & (p != ref),
    }
    h, w = ref.shape[1:]
    half = OVERLAY_CROP // 2
    out = []
    for kind in DISAGREEMENT_KINDS:
        mask = masks[kind]
        if not mask.any():
            continue
        components, _ = ndimage.label(mask, structure=_IN_PLANE_8)
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        biggest = int(sizes.argmax())
        zs, ys, xs = np.nonzero(components == biggest)  # one slice: components never cross slices
        k = int(zs[0])
        cy = int(np.clip(int(round(ys.mean())), half, max(h - half, half)))
        cx = int(np.clip(int(round(xs.mean())), half, max(w - half, half)))
        win = (k, slice(max(cy - half, 0), cy + half), slice(max(cx - half, 0), cx + half))
        out.append(
            {
                "kind": kind,
                "voxels": int(sizes[biggest]),
                "slice": k,
                "hu": loaded.hu[win],
                "pred": pred[win],
                "ref": loaded.labels[win],
            }
        )
    out.sort(key=lambda c: -c["voxels"])
    return out


def error_line(scan: scan_sources.ScanInput, e: Exception) -> dict:
    """The ``errors.jsonl`` line of a scan that failed (its reason names no path and no header value)."""
    return {
        "scan_id": scan.scan_id,
        # the series or volume, or the shard file holding the scan
        "input": scan.scan_id if scan.source in ("dicom", "nifti") else scan.source,
        "stage": "score",
        "kind": getattr(e, "kind", e.__class__.__name__),
        "reason": scan.reason_of(e),
    }
