"""The heart's neighbourhood of a CT scan, found from HU alone: where coronary calcium can be.

``heart_region(hu, spacing)`` returns a boolean mask ``(Z, H, W)`` on the scan's grid. The scorer keeps
predicted calcium only inside it (``calcjax.score --heart_region``, on by default), which removes the
bright things a segmentation network trained on phantoms calls coronary calcium on real scans: ribs,
spine, sternum, costal cartilage, lung nodules, bone edges at the border of a gated field of view.

It is a fixed anatomical rule, trained on nothing; its constants come from anatomy and CT physics (below),
its surface margin from phantoms (of 15, 25 and 35 mm, the smallest that kept every phantom lesion), not
from a search over the real sample (whose masks were looked at while the steps were designed: README).
Steps, on a coarse grid of about ``COARSE_MM`` mm pixels (block means):

1. **Lungs**, per slice: connected components of HU < ``LUNG_MAX_HU`` of at least ``LUNG_MIN_AREA_MM2``, that
   are not the air outside the body (a component touching the image border, in a field of view of at
   least ``WHOLE_BODY_FOV_MM`` that holds the whole body, or whose mean is below ``OUTSIDE_AIR_MEAN_HU``
   in a smaller gated one, where the lungs themselves reach the border). In a whole-body field of view,
   slices with less than ``MIN_LUNG_SHARE`` of the largest lung area are the upper abdomen: no lungs there.
   Holes in the lungs smaller than ``LUNG_HOLE_MAX_MM2`` (pulmonary vessels, nodules) count as lung.
2. **Mediastinum core**: inside each slice's convex hull of the lungs, minus the lungs, the points more
   than ``CORE_DEPTH_MM`` from the hull's edge and the lungs (in-plane); the largest 3D component of those
   is the heart and great vessels (the strips of chest wall the hull takes in are thinner than twice that).
3. **Region**: body (HU >= ``LUNG_MAX_HU``), not lung, within ``CORE_DEPTH_MM + SURFACE_MARGIN_MM`` in-plane
   and ``CORE_DEPTH_MM + Z_MARGIN_MM`` along z (an ellipsoidal 3D reach, in mm) of the core: the
   epicardial fat, where the coronaries run, even where the heart bulges in front of the lungs against
   the anterior chest wall, and a margin above and below the lungs' extent.
4. **Bone out**: on the full grid, every connected component of HU >= ``calcjax.core.agatston.
   CALCIUM_THRESHOLD_HU`` of at least ``BONE_MIN_MM3`` is removed (vertebrae, ribs, sternum: thousands of
   mm^3; the largest coronary lesions are a few hundred).

A scan with no lung found (a phantom without lungs, an abdomen) gets the whole grid: nothing is removed,
and :func:`heart_region` says so through ``found``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from calcjax.core.agatston import CALCIUM_THRESHOLD_HU
from calcjax.core.hu import CHEST_FOV_MIN_MM

LUNG_MAX_HU = -400.0  # aerated lung (-900 to -700) and air below; soft tissue, fat (-100) and blood above
OUTSIDE_AIR_MEAN_HU = -960.0  # room air reads -1000; the mean of a lung component is -900 to -700
LUNG_MIN_AREA_MM2 = 400.0  # one lung in a slice through the heart: thousands of mm^2; trachea ~250
LUNG_HOLE_MAX_MM2 = 300.0  # holes in a lung this small are its vessels and nodules (a 20 mm disc): lung
WHOLE_BODY_FOV_MM = CHEST_FOV_MIN_MM  # a chest FOV (350-500 mm) holds the whole body; a gated one ~200 mm
# In a whole-body field of view, slices whose lungs cover less than this share of the scan's largest lung
# area are below the heart (the costophrenic recesses around the upper abdomen) and build no hull: the
# heart's inferior wall lies on the diaphragm dome, where the lungs still cover about half their largest
# area. (A gated field of view cuts the lungs at every level, so there the rule would cut the heart.)
MIN_LUNG_SHARE = 0.25
CORE_DEPTH_MM = 15.0  # the heart is 80-120 mm across; chest-wall strips inside the lung hull are < 30 mm
# Coronaries lie in the epicardial fat, up to ~20 mm from the myocardium in a fat heart, and the heart's
# anterior wall can bulge 20-30 mm in front of the line between the lungs' anterior tips (the core's edge
# is 15 mm behind that line): 15 mm of margin lost LAD calcium in 2 of the 10 phantoms it was checked on
# (tests/test_heart_region.py keeps one of them).
SURFACE_MARGIN_MM = 35.0
# Above and below, the core itself reaches the heart's base and the diaphragm; a wider margin there only
# takes in the great vessels above the heart and the upper abdomen below it.
Z_MARGIN_MM = 15.0
BONE_MIN_MM3 = 1500.0  # a vertebra or rib segment >= 130 HU: thousands of mm^3; a coronary lesion: < 500
COARSE_MM = 2.0  # pixel of the coarse grid steps 1-3 run on


@dataclasses.dataclass(frozen=True)
class HeartRegion:
    """``mask``: bool ``(Z, H, W)``, True where coronary calcium can be; ``found``: whether lungs and a
    mediastinum were found (False: ``mask`` is the whole grid)."""

    mask: np.ndarray
    found: bool

    @property
    def status(self) -> str:
        """``found`` or ``not_found`` (the score row's ``heart_region``)."""
        return "found" if self.found else "not_found"


def _hull_fill(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a 2D mask's pixels (pixel centres; a point is inside within 0.5 px)."""
    points = np.argwhere(mask)
    if len(points) < 3:
        return mask.copy()
    try:
        hull = ConvexHull(points)
    except QhullError:  # all points on a line
        return mask.copy()
    yy, xx = np.indices(mask.shape, dtype=np.float32)
    normals, offsets = hull.equations[:, :2].astype(np.float32), hull.equations[:, 2].astype(np.float32)
    inside = np.ones(mask.shape, bool)
    for (ny, nx), c in zip(normals, offsets, strict=True):
        inside &= ny * yy + nx * xx + c <= 0.5
    return inside


def _lungs(coarse: np.ndarray, pixel_mm: float, whole_body: bool) -> np.ndarray:
    """Per-slice lung masks ``(Z, h, w)`` of the coarse HU volume (step 1 of the module docstring)."""
    lungs = np.zeros(coarse.shape, bool)
    for k, image in enumerate(coarse):
        lab, n = ndi.label(image < LUNG_MAX_HU)
        if n == 0:
            continue
        ids = np.arange(1, n + 1)
        area = np.bincount(lab.ravel(), minlength=n + 1)[1:] * pixel_mm**2
        mean = ndi.mean(image, lab, ids)
        touches = np.zeros(n + 1, bool)
        for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
            touches[edge] = True
        outside = touches[1:] & (whole_body | (mean <= OUTSIDE_AIR_MEAN_HU))
        keep = np.concatenate([[False], (area >= LUNG_MIN_AREA_MM2) & ~outside])
        lung = keep[lab]
        holes, m = ndi.label(ndi.binary_fill_holes(lung) & ~lung)
        if m:
            small = np.concatenate(
                [[False], np.bincount(holes.ravel())[1:] * pixel_mm**2 < LUNG_HOLE_MAX_MM2]
            )
            lung |= small[holes]
        lungs[k] = lung
    return lungs


def heart_region(hu: np.ndarray, spacing: tuple[float, float, float]) -> HeartRegion:
    """The heart's neighbourhood of one scan (module docstring).

    Args:
      hu: HU volume ``(Z, H, W)`` (any real or integer dtype), slices in order.
      spacing: ``(dz, dy, dx)`` in mm (dz: the slice increment).
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be a (Z, H, W) volume, got {hu.shape}")
    dz, dy, dx = (float(s) for s in spacing)
    z, h, w = hu.shape
    step = max(1, int(round(COARSE_MM / max(dy, dx))))
    hc, wc = -(-h // step), -(-w // step)
    padded = np.pad(hu.astype(np.float32), ((0, 0), (0, hc * step - h), (0, wc * step - w)), mode="edge")
    coarse = padded.reshape(z, hc, step, wc, step).mean(axis=(2, 4))
    pixel_mm = max(dy, dx) * step
    whole_body = max(h * dy, w * dx) >= WHOLE_BODY_FOV_MM
    lungs = _lungs(coarse, pixel_mm, whole_body=whole_body)
    if whole_body:
        area = lungs.sum(axis=(1, 2))
        lungs[area < MIN_LUNG_SHARE * area.max()] = False

    inner = np.zeros(coarse.shape, bool)  # hull of the lungs, minus the lungs
    for k in range(z):
        if lungs[k].any():
            inner[k] = _hull_fill(lungs[k]) & ~lungs[k] & (coarse[k] >= LUNG_MAX_HU)
    depth = np.stack([ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] for m in inner]) * pixel_mm
    lab, n = ndi.label(depth > CORE_DEPTH_MM)
    if n == 0:
        return HeartRegion(np.ones(hu.shape, bool), found=False)
    core = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    reach_mm = CORE_DEPTH_MM + SURFACE_MARGIN_MM
    z_scale = reach_mm / (CORE_DEPTH_MM + Z_MARGIN_MM)  # slices count this much further: less reach in z
    distance = ndi.distance_transform_edt(~core, sampling=(dz * z_scale, pixel_mm, pixel_mm))
    near = (distance <= reach_mm) & ~lungs & (coarse >= LUNG_MAX_HU)
    mask = np.repeat(np.repeat(near, step, axis=1), step, axis=2)[:, :h, :w]

    bright, n = ndi.label(hu >= CALCIUM_THRESHOLD_HU)
    if n:
        volume = np.bincount(bright.ravel())[1:] * (dz * dy * dx)
        bone = np.concatenate([[False], volume >= BONE_MIN_MM3])
        mask &= ~bone[bright]
    return HeartRegion(mask, found=True)


def restrict(pred: np.ndarray, region: HeartRegion) -> np.ndarray:
    """Predicted labels ``(Z, H, W)`` with everything outside the region set to background (0)."""
    return np.where(region.mask, pred, 0).astype(pred.dtype)
