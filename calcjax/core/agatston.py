"""Agatston, volume and mass calcium scores and the cardiovascular risk category.

Pure numpy + scipy (no jax), so a light process pool can score. Definitions (docs/background.md,
"Agatston as implementations do it"; Agatston et al., JACC 1990; the "equivalent Agatston score" of vendors
for other slice widths):

- Candidate calcium: voxels with a coronary label (1 LM, 2 LAD, 3 LCX, 4 RCA) and HU >= ``threshold_hu``
  (130 HU at 120 kVp; ``kvp_specific_threshold=True`` takes the threshold from :data:`KVP_THRESHOLD_HU`).
- Lesions: 2D 8-connected components of candidate voxels, per slice, regardless of artery.
- A lesion counts when its area (pixels x dy x dx, mm^2) is >= ``min_area_mm2`` (1 mm^2).
- Weight by the lesion's peak HU: 130-199 -> 1, 200-299 -> 2, 300-399 -> 3, >= 400 -> 4.
- Lesion score = area (mm^2) x weight x (slice increment dz / 3 mm), so thin, thick and overlapping
  reconstructions give the equivalent 3 mm score.
- A lesion's artery is the majority label of its voxels (ties go to the lower label value).
- Volume (mm^3): number of voxels in counted lesions x dz x dy x dx.
- Mass (mg): sum over counted voxels of (voxel volume mm^3 x HU) x ``mass_calibration`` (mg per HU mm^3),
  reported only when a calibration factor is given.
- Risk category from the total Agatston A: 0 (A = 0), I (0 < A <= 10), II (10 < A <= 100),
  III (100 < A <= 400), IV (A > 400).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

ARTERIES: tuple[str, ...] = ("LM", "LAD", "LCX", "RCA")
"""Artery names; label value = index + 1."""

RISK_CATEGORY_NAMES: tuple[str, ...] = (
    "0 (none)",
    "I (minimal, 1-10)",
    "II (mild, 11-100)",
    "III (moderate, 101-400)",
    "IV (severe, >400)",
)
RISK_UPPER_BOUNDS: tuple[float, ...] = (0.0, 10.0, 100.0, 400.0)
"""Inclusive upper Agatston bound of categories 0-III; category IV is everything above 400."""

WEIGHT_LOWER_HU: tuple[float, ...] = (130.0, 200.0, 300.0, 400.0)
"""Peak-HU lower bounds of density weights 1-4 (the first is replaced by the threshold in use)."""

KVP_THRESHOLD_HU: dict[int, float] = {100: 147.0, 120: 130.0}
"""kVp-specific calcium thresholds (HU); 100 kVp ~145-147 HU in the literature (kVp-adapted
thresholds of low-voltage calcium-scoring studies)."""
CALCIUM_THRESHOLD_HU = KVP_THRESHOLD_HU[120]
"""The standard (120 kVp) candidate-calcium threshold: the one home of the 130 HU every module uses."""

REFERENCE_INCREMENT_MM = 3.0


def risk_category(total: float) -> int:
    """Risk category 0-4 of a total Agatston score (see module docstring for the bounds)."""
    return int(np.searchsorted(RISK_UPPER_BOUNDS, float(total), side="left"))


def candidate_mask(hu: np.ndarray, threshold_hu: float = CALCIUM_THRESHOLD_HU) -> np.ndarray:
    """Voxels that may be calcium: HU >= ``threshold_hu`` (the one definition every figure uses)."""
    return np.asarray(hu) >= threshold_hu


def grow_to_threshold(
    labels: np.ndarray, hu: np.ndarray, steps: int, threshold_hu: float = CALCIUM_THRESHOLD_HU
) -> np.ndarray:
    """``labels`` (0 background, 1-4 arteries; ``(H, W)`` or ``(Z, H, W)``) on the candidate voxels of
    ``hu`` (same shape): kept only where ``candidate_mask``, then grown ``steps`` times by one 4-connected
    in-plane pixel into background candidate voxels (never across slices; where two arteries arrive at
    once the higher label takes the voxel). A reference lesion is its voxels at >= the threshold, so this
    is a label's footprint at the threshold, reached within ``steps`` pixels. Same dtype as ``labels``."""
    candidate = candidate_mask(hu, threshold_hu)
    out = np.where(candidate, labels, 0).astype(np.asarray(labels).dtype)
    cross = np.zeros((3, 3), bool)
    cross[1, :] = cross[:, 1] = True
    footprint = cross if out.ndim == 2 else cross[None]
    for _ in range(steps):
        grown = np.where((out == 0) & candidate, ndimage.grey_dilation(out, footprint=footprint), out)
        if np.array_equal(grown, out):
            break
        out = grown
    return out


def density_weight(peak_hu: np.ndarray | float, threshold_hu: float = CALCIUM_THRESHOLD_HU) -> np.ndarray:
    """Agatston density weight 1-4 of a lesion's peak HU (0 below ``threshold_hu``)."""
    peak = np.asarray(peak_hu, dtype=np.float64)
    bounds = np.array((threshold_hu,) + WEIGHT_LOWER_HU[1:])
    return np.searchsorted(bounds, peak, side="right").astype(np.int64)


def threshold_for(
    kvp: float | None, threshold_hu: float = CALCIUM_THRESHOLD_HU, kvp_specific_threshold: bool = False
) -> float:
    """The calcium threshold (HU) of a scan: ``threshold_hu``, or with ``kvp_specific_threshold`` the one
    of :data:`KVP_THRESHOLD_HU` for its tube voltage (ValueError for an unknown one)."""
    if not kvp_specific_threshold:
        return float(threshold_hu)
    if kvp is None:
        raise ValueError("no usable KVP (0018,0060) in the scan: a kVp-specific calcium threshold needs it")
    key = int(round(kvp))
    if key not in KVP_THRESHOLD_HU:
        raise ValueError(
            f"no kVp-specific calcium threshold for {kvp} kVp (known: {sorted(KVP_THRESHOLD_HU)})"
        )
    return KVP_THRESHOLD_HU[key]


def score(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    kvp: float = 120.0,
    threshold_hu: float = CALCIUM_THRESHOLD_HU,
    kvp_specific_threshold: bool = False,
    min_area_mm2: float = 1.0,
    mass_calibration: float | None = None,
) -> dict:
    """Scores one scan.

    Args:
      hu: ``(z, y, x)`` Hounsfield units (any real dtype); NaN or inf is refused.
      labels: ``(z, y, x)`` integer labels, 0 background and 1-4 LM/LAD/LCX/RCA (a binary 0/1 mask
        is read as "calcium of unknown artery" and counted as LM; pass artery labels for per-artery scores).
      spacing: ``(dz, dy, dx)`` in mm, dz the slice increment.
      kvp: tube voltage, used only with ``kvp_specific_threshold``.
      threshold_hu: calcium threshold in HU (default 130).
      kvp_specific_threshold: take the threshold from :data:`KVP_THRESHOLD_HU` for ``kvp``.
      min_area_mm2: smallest lesion area that counts (mm^2).
      mass_calibration: mg of calcium per (HU x mm^3); mass is reported only when given.

    Returns:
      A dict with ``agatston`` (total), ``agatston_per_artery``, ``volume_mm3`` (total),
      ``volume_per_artery``, ``mass_mg`` (None without calibration), ``mass_per_artery``,
      ``risk_category`` (0-4), ``risk_category_name``, ``threshold_hu``, ``num_lesions`` (counted 2D
      lesions) and ``lesions``: a list of dicts (slice, artery, area_mm2, peak_hu, weight, score,
      num_voxels, counted) for every 2D lesion, counted or not.
    """
    hu, labels, (dz, dy, dx) = _checked_inputs(hu, labels, spacing)
    thr = threshold_for(kvp, threshold_hu, kvp_specific_threshold)
    empty = _empty_result(thr, mass_calibration)
    idx, cid, n = _in_plane_lesions(hu, labels, thr)
    if n == 0:
        return empty
    t = _lesion_table(hu, labels, idx, cid, n)
    area = t["npix"] * dy * dx
    counted = area >= min_area_mm2
    weight = density_weight(t["peak"], thr)
    lesion_score = np.where(counted, area * weight * (dz / REFERENCE_INCREMENT_MM), 0.0)
    voxel_mm3 = dz * dy * dx

    def per_artery(values: np.ndarray) -> dict[str, float]:
        sums = np.bincount(t["artery"], weights=values, minlength=len(ARTERIES))
        return {name: float(s) for name, s in zip(ARTERIES, sums, strict=True)}

    agatston = per_artery(lesion_score)
    volume = per_artery(np.where(counted, t["npix"] * voxel_mm3, 0.0))
    total = float(sum(agatston.values()))
    mass = None
    if mass_calibration is not None:
        mass = per_artery(np.where(counted, t["hu_sum"] * voxel_mm3 * mass_calibration, 0.0))
    cat = risk_category(total)
    lesions = [
        {"slice": int(t["slice"][i]), "artery": ARTERIES[t["artery"][i]], "area_mm2": float(area[i]),
         "peak_hu": float(t["peak"][i]), "weight": int(weight[i]), "score": float(lesion_score[i]),
         "num_voxels": int(t["npix"][i]), "counted": bool(counted[i])}
        for i in range(n)
    ]  # fmt: skip
    return {
        **empty,
        "agatston": total,
        "agatston_per_artery": agatston,
        "volume_mm3": float(sum(volume.values())),
        "volume_per_artery": volume,
        "mass_mg": None if mass is None else float(sum(mass.values())),
        "mass_per_artery": mass,
        "risk_category": cat,
        "risk_category_name": RISK_CATEGORY_NAMES[cat],
        "num_lesions": int(counted.sum()),
        "lesions": lesions,
    }


def _checked_inputs(hu, labels, spacing) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(hu, labels, spacing) as arrays and floats, or ValueError: unequal or non-3D volumes, spacing not
    positive, non-finite HU, labels outside 0..4."""
    hu = np.asarray(hu)
    labels = np.asarray(labels)
    if hu.ndim != 3 or hu.shape != labels.shape:
        raise ValueError(f"hu {hu.shape} and labels {labels.shape} must be equal (z, y, x) volumes")
    dz, dy, dx = (float(s) for s in spacing)
    if min(dz, dy, dx) <= 0:
        raise ValueError(f"spacing must be positive mm, got {spacing}")
    _check_finite(hu)
    if labels.size and (labels.max() > len(ARTERIES) or labels.min() < 0):
        raise ValueError(f"labels must lie in 0..{len(ARTERIES)}, got {labels.min()}..{labels.max()}")
    return hu, labels, (dz, dy, dx)


def _lesion_table(hu: np.ndarray, labels: np.ndarray, idx: np.ndarray, cid: np.ndarray, n: int) -> dict:
    """Per 2D lesion (``cid`` of each candidate voxel ``idx`` of the flattened volume, ``n`` lesions):
    ``npix`` voxels, ``peak`` and ``hu_sum`` HU, ``artery`` (index into ARTERIES: the majority label of
    its voxels, ties to the lower label) and ``slice``."""
    hu_v = hu.ravel()[idx].astype(np.float64)
    lab_v = labels.ravel()[idx].astype(np.int64)
    peak = np.full(n, -np.inf)
    np.maximum.at(peak, cid, hu_v)
    votes = np.bincount(cid * len(ARTERIES) + (lab_v - 1), minlength=n * len(ARTERIES))
    slice_of = np.zeros(n, dtype=np.int64)
    slice_of[cid] = idx // (hu.shape[1] * hu.shape[2])
    return {
        "npix": np.bincount(cid, minlength=n),
        "peak": peak,
        "hu_sum": np.bincount(cid, weights=hu_v, minlength=n),
        "artery": votes.reshape(n, len(ARTERIES)).argmax(axis=1),
        "slice": slice_of,
    }


def _in_plane_lesions(hu: np.ndarray, labels: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate voxels and their 2D 8-connected lesion ids.

    Works on the sparse set of labelled voxels (slices without labels are skipped by one ``any`` pass),
    joining in-plane neighbours through a sparse graph, so the cost follows the calcium, not the volume.

    Returns:
      ``idx``: ascending linear indices of candidate voxels into the ``(z, y, x)`` volume;
      ``cid``: their lesion ids 0..n-1, numbered in raster order of each lesion's first voxel; ``n``.
    """
    nz, ny, nx = labels.shape
    plane = ny * nx
    none = np.zeros(0, np.int64)
    if labels.size == 0:
        return none, none, 0
    zs = np.flatnonzero(labels.reshape(nz, plane).any(axis=1))
    local = np.flatnonzero(labels[zs])
    idx = zs[local // plane] * plane + local % plane
    idx = idx[hu.reshape(-1)[idx] >= thr]
    if idx.size == 0:
        return none, none, 0
    x, y = idx % nx, (idx // nx) % ny
    rows, cols = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # forward half of the 8-neighbourhood
        nb = idx + dy * nx + dx
        pos = np.minimum(np.searchsorted(idx, nb), idx.size - 1)
        hit = (x + dx >= 0) & (x + dx < nx) & (y + dy < ny) & (idx[pos] == nb)
        rows.append(np.flatnonzero(hit))
        cols.append(pos[hit])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sparse.coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(idx.size, idx.size))
    n, cid = csgraph.connected_components(graph, directed=False)
    first = np.full(n, idx.size, np.int64)
    np.minimum.at(first, cid, np.arange(idx.size))
    rank = np.empty(n, np.int64)
    rank[np.argsort(first)] = np.arange(n)
    return idx, rank[cid], int(n)


def _check_finite(hu: np.ndarray) -> None:
    if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
        bad = int((~np.isfinite(hu)).sum())
        raise ValueError(f"HU volume holds {bad} NaN/inf voxels; refusing to score")


def _empty_result(thr: float, mass_calibration: float | None) -> dict:
    zeros = {name: 0.0 for name in ARTERIES}
    return {
        "agatston": 0.0,
        "agatston_per_artery": dict(zeros),
        "volume_mm3": 0.0,
        "volume_per_artery": dict(zeros),
        "mass_mg": None if mass_calibration is None else 0.0,
        "mass_per_artery": None if mass_calibration is None else dict(zeros),
        "risk_category": 0,
        "risk_category_name": RISK_CATEGORY_NAMES[0],
        "threshold_hu": thr,
        "num_lesions": 0,
        "lesions": [],
    }
