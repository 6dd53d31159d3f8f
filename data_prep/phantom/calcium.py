"""Coronary calcium lesions and the calcified confounders a detector must reject.

Every calcification is a smooth ellipsoidal blob: its calcium fraction ``P`` at a voxel is the
slab-averaged (slice thickness), motion-averaged (non-gated scans, RCA and LCX) and PSF-blurred
(Gaussian edge, sigma 0.4 mm) indicator of the ellipsoid, and the voxel's noise-free HU is
``base * (1 - P) + density * P``: partial volume, so small lesions read lower than their density.
The density is solved so the noise-free peak hits a target in an Agatston weight band
(130-199, 200-299, 300-399, >= 400 HU; capped at 3000 HU).

Confounders (label 0; the non-coronary calcium a scorer must reject): aortic wall calcification (arcs of
200-1000 HU), aortic valve nodules at the root beside the LM origin, mitral annular calcification (a C band
next to the LCX), costal cartilage calcification, and small blobs whose noise-free peak lies just above 130
HU.

Composition: each blob claims the voxels where its HU exceeds every earlier claim (``owner_hu``), and
``owner_id`` records which blob (0 none); coronary label = the owner's artery where the noise-free HU
>= ``SUPPORT_HU`` and the written HU >= 130, i.e. a thresholded annotation as in clinical datasets.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import special

from data_prep.phantom.acquisition import Acquisition
from data_prep.phantom.anatomy import ARTERY_LABELS, Centerline, Patient
from data_prep.phantom.tissue import AxialGrid

PSF_SIGMA_MM = 0.4
SUPPORT_HU = 100.0
MAX_DENSITY_HU = 3000.0
WEIGHT_BANDS_HU = ((150.0, 190.0), (215.0, 290.0), (310.0, 390.0), (430.0, 900.0))


@dataclasses.dataclass
class Blob:
    """One calcification.

    Attributes:
      kind: ``lesion`` (coronary, labelled) or a confounder kind.
      artery: LM/LAD/LCX/RCA for lesions, None for confounders.
      centre: LPS mm.
      axes: ``(3, 3)`` rows = unit directions of the ellipsoid axes (first = along the vessel).
      semi_mm: ellipsoid semi-axes along ``axes`` (mm) before ``scale``.
      target_peak_hu: noise-free peak HU the density is solved for.
      motion: LPS mm vector of in-plane cardiac motion (blur along it), zeros when gated.
      scalable: whether the risk-category search may scale the size.
      max_density_hu: cap on the solved density (calcium 3000 HU; metal far above, so a thin wire still
        reaches its target peak, as steel does).
      density_hu, peak_noise_free_hu: set by rendering.
    """

    kind: str
    artery: str | None
    centre: np.ndarray
    axes: np.ndarray
    semi_mm: np.ndarray
    target_peak_hu: float
    motion: np.ndarray
    scalable: bool = True
    max_density_hu: float = MAX_DENSITY_HU
    density_hu: float = float("nan")
    peak_noise_free_hu: float = float("nan")

    @property
    def label(self) -> int:
        return ARTERY_LABELS[self.artery] if self.artery else 0


def _frame(tangent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t = tangent / np.linalg.norm(tangent)
    helper = np.array([0.0, 0.0, 1.0]) if abs(t[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(t, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(t, e1)
    ang = rng.uniform(0, 2 * np.pi)
    e1, e2 = np.cos(ang) * e1 + np.sin(ang) * e2, -np.sin(ang) * e1 + np.cos(ang) * e2
    return np.stack([t, e1, e2])


# (number of lesions, length range mm, width range mm) per target risk category.
_CATEGORY_PLAN = {
    1: ((1, 1), (1.6, 2.4), (1.3, 1.8)),
    2: ((2, 3), (2.5, 4.5), (1.8, 2.8)),
    3: ((3, 5), (4.0, 7.0), (2.6, 3.8)),
    4: ((8, 12), (5.0, 9.5), (3.0, 4.5)),
}


def _lesion_plan(target_category, coronaries, acq, rng):
    """The lesion count (drawn), length and width ranges (mm) of ``target_category``, the z range (mm) a
    lesion centre may take (the scan's coverage less 4 mm margins), and ``place``: a lesion placed on a
    coronary point in that range."""
    (n_lo, n_hi), lengths, widths = _CATEGORY_PLAN[target_category]
    n = int(rng.integers(n_lo, n_hi + 1))
    zs = acq.slice_z()
    z_lo, z_hi = zs[0] + 4.0, zs[-1] - 4.0
    motion_dir = np.array([np.cos(acq.motion_angle_rad), np.sin(acq.motion_angle_rad), 0.0])
    place = functools.partial(
        _lesion_on, list(coronaries), coronaries, z_lo, z_hi, rng, motion_dir * acq.motion_mm
    )
    return n, lengths, widths, (z_lo, z_hi), place


def weight_bands_hu(top_max_hu: float | None = None) -> tuple[tuple[float, float], ...]:
    """``WEIGHT_BANDS_HU`` with the top band's upper edge at ``top_max_hu`` (HU; None: as it is). Real
    dense plaques peak above 900 HU (two real lesions of 834 and 934 HU held a third of the real
    sample's calcium voxels and were missed); the top band's draw is the same uniform number, so a plaque
    of that band peaks at ``low + u * (top_max_hu - low)`` where it peaked at ``low + u * (900 - low)``."""
    if top_max_hu is None:
        return WEIGHT_BANDS_HU
    low = WEIGHT_BANDS_HU[-1][0]
    if not low < top_max_hu <= MAX_DENSITY_HU:
        raise ValueError(f"top band maximum {top_max_hu!r} HU: needs {low} < maximum <= {MAX_DENSITY_HU}")
    return (*WEIGHT_BANDS_HU[:-1], (low, float(top_max_hu)))


def _add_speck(blobs: list[Blob], place, rng: np.random.Generator, bands=WEIGHT_BANDS_HU) -> None:
    """With probability 0.6, a speck under the 1 mm^2 Agatston limit: annotated, must not count."""
    if rng.uniform() < 0.6:
        peak = rng.uniform(*bands[int(rng.integers(1, 4))])
        blobs.append(place(length=0.7, width=0.6, peak=peak, scalable=False))


def _lesion_on(
    arteries, coronaries, z_lo, z_hi, rng, motion, *, length, width, peak, scalable, at=None, bulky=False
) -> Blob:
    """A lesion on a random artery point inside ``z_lo..z_hi`` (or at ``at = (artery, point index)``);
    its width is capped at the vessel's diameter + 1 mm unless ``bulky``."""
    if at is not None:
        artery, i = at
        line = coronaries[artery]
    for _ in range(0 if at is not None else 100):
        artery = str(rng.choice(arteries, p=_artery_weights(arteries)))
        line = coronaries[artery]
        i = int(rng.integers(0, len(line.points)))
        if z_lo <= line.points[i, 2] <= z_hi:
            break
    frame = _frame(line.tangents()[i], rng)
    r = float(line.radii[i])
    if not bulky:
        width = min(width, 2.0 * r + 1.0)
    eccentric = frame[1] * r * rng.uniform(0.2, 0.6)
    moving = artery in ("RCA", "LCX")
    return Blob(
        kind="lesion",
        artery=artery,
        centre=line.points[i] + eccentric,
        axes=frame,
        semi_mm=np.array([length / 2, width / 2, width / 2 * rng.uniform(0.7, 1.0)]),
        target_peak_hu=float(peak),
        motion=motion if moving else np.zeros(3),
        scalable=scalable,
    )


# Phantom v2 plaques (driven by docs/realism): the real sample's lesions peak lower (median 306
# against v1's 449 HU) and its large plaques are confluent runs along the LAD and LCX. v2 draws the weight
# band with these probabilities (130-199, 200-299, 300-399, >= 400 HU) instead of uniformly, and turns a
# lesion, with CLUSTER_PROBABILITY, into 2-4 overlapping eccentric blobs along its vessel.
V2_BAND_PROBABILITIES = (0.3, 0.3, 0.2, 0.2)
CLUSTER_PROBABILITY = 0.45
CLUSTER_STEP = (0.5, 0.9)  # spacing of a cluster's blobs along the vessel, in blob lengths


def plan_lesions(
    target_category: int,
    coronaries: dict[str, Centerline],
    acq: Acquisition,
    rng: np.random.Generator,
    version: int = 1,
    top_peak_max_hu: float | None = None,
) -> list[Blob]:
    """Coronary lesions sized for ``target_category`` (0-4), within the scan's z coverage. ``version`` 2
    and 3 (phantom v2/v3): peaks drawn with ``V2_BAND_PROBABILITIES`` and confluent clusters (above);
    version 1 draws exactly what it always drew. ``top_peak_max_hu``: the top weight band's upper edge
    (:func:`weight_bands_hu`; the same draws)."""
    bands_hu = weight_bands_hu(top_peak_max_hu)
    if target_category == 0:
        return []
    n, (l_lo, l_hi), (w_lo, w_hi), z_range, place = _lesion_plan(target_category, coronaries, acq, rng)
    if version == 1:
        bands = rng.permutation(4) if target_category == 4 else rng.integers(0, 4, size=n)
    blobs = []
    for i in range(n):
        band = int(bands[i % len(bands)]) if version == 1 else int(rng.choice(4, p=V2_BAND_PROBABILITIES))
        length, width = rng.uniform(l_lo, l_hi), rng.uniform(w_lo, w_hi)
        first = place(length=length, width=width, peak=rng.uniform(*bands_hu[band]), scalable=True)
        blobs.append(first)
        if version >= 2 and rng.uniform() < CLUSTER_PROBABILITY:
            blobs += _cluster(first, length, width, coronaries, z_range, place, rng)
    _add_speck(blobs, place, rng, bands_hu)
    return blobs


# A bulky plaque (``bulky_plaque``): a dense calcification wider than its vessel. Real dense plaques bloom
# into masses of several mm (the real sample's largest lesion, 934 HU, spans 6 x 10 mm in-plane over
# three 3 mm slices and holds a quarter of its calcium voxels), where every other phantom plaque's width is
# capped at the vessel's diameter + 1 mm and the risk-category search shrinks bright plaques; phantom-trained
# models then took large bright blobs for non-coronary calcium (the lesion probe found a 2 mm-SD, 900 HU
# disc at 30% of real lesion places against 65% for a 1 mm one). Run K (docs/experiments/) trained on
# C's data with one in half the scans with calcium: it did not help on the real scans.
BULKY_LENGTH_MM = (5.0, 11.0)
BULKY_WIDTH_MM = (4.5, 9.0)
BULKY_PEAK_HU = (500.0, 1300.0)


def bulky_plaque(coronaries: dict[str, Centerline], acq: Acquisition, rng: np.random.Generator) -> Blob:
    """One bulky plaque (above) on a random artery point within the scan's coverage: length, width and
    noise-free peak uniform in ``BULKY_LENGTH_MM`` / ``BULKY_WIDTH_MM`` / ``BULKY_PEAK_HU``, not scaled by
    the risk-category search."""
    *_, place = _lesion_plan(1, coronaries, acq, rng)
    return place(
        length=rng.uniform(*BULKY_LENGTH_MM),
        width=rng.uniform(*BULKY_WIDTH_MM),
        peak=rng.uniform(*BULKY_PEAK_HU),
        scalable=False,
        bulky=True,
    )


def _cluster(first: Blob, length, width, coronaries, z_range, place, rng: np.random.Generator) -> list[Blob]:
    """1-3 more blobs next to ``first`` (drawn ``length`` x ``width`` mm) along its vessel, in one
    direction, each ``CLUSTER_STEP`` of the length further on, with sizes and peaks near ``first``'s
    (stops at the vessel's end or the z range)."""
    line = coronaries[first.artery]
    i = int(np.argmin(np.linalg.norm(line.points - first.centre, axis=1)))
    step_mm = float(np.linalg.norm(np.diff(line.points, axis=0), axis=1).mean())
    direction = 1 if rng.uniform() < 0.5 else -1
    out = []
    for _ in range(int(rng.integers(1, 4))):
        i += direction * max(1, int(round(rng.uniform(*CLUSTER_STEP) * length / step_mm)))
        if not (0 <= i < len(line.points)) or not (z_range[0] <= line.points[i, 2] <= z_range[1]):
            break
        peak = float(
            np.clip(first.target_peak_hu * rng.uniform(0.8, 1.2), WEIGHT_BANDS_HU[0][0], MAX_DENSITY_HU)
        )
        out.append(
            place(
                length=length * rng.uniform(0.7, 1.2),
                width=width * rng.uniform(0.8, 1.1),
                peak=peak,
                scalable=True,
                at=(first.artery, i),
            )
        )
    return out


def _artery_weights(arteries):
    w = np.array([{"LM": 0.1, "LAD": 0.4, "LCX": 0.2, "RCA": 0.3}[a] for a in arteries])
    return w / w.sum()


def plan_confounders(
    patient: Patient,
    coronaries: dict[str, Centerline],
    aorta: Centerline,
    acq: Acquisition,
    rng: np.random.Generator,
) -> list[Blob]:
    """Calcified structures outside the coronaries (label 0), drawn per scan."""
    blobs: list[Blob] = []
    zs = acq.slice_z()

    def in_z(p: np.ndarray) -> bool:
        return bool(zs[0] <= p[2] <= zs[-1])

    def ball(centre, radius: float, peak: float, kind: str) -> Blob:
        return Blob(kind, None, np.asarray(centre, float), np.eye(3), np.full(3, radius), peak, np.zeros(3))

    # Aortic wall calcification: arcs on the wall of the ascending / descending aorta.
    for _ in range(int(rng.integers(1, 5)) if rng.uniform() < 0.8 else 0):
        i = int(rng.integers(0, len(aorta.points)))
        c, r = aorta.points[i], aorta.radii[i]
        frame = _frame(aorta.tangents()[i], rng)
        start, extent = rng.uniform(0, 2 * np.pi), rng.uniform(np.radians(30), np.radians(100))
        peak = rng.uniform(200.0, 1000.0)
        for ang in np.arange(start, start + extent, 1.0 / r):
            p = c + (r - 0.5) * (np.cos(ang) * frame[1] + np.sin(ang) * frame[2])
            if in_z(p):
                blobs.append(ball(p, rng.uniform(0.8, 1.4), peak, "aortic_wall"))
    # Aortic valve nodules at the root, beside the LM ostium.
    if rng.uniform() < 0.6:
        root = np.asarray(patient.aortic_root)
        for _ in range(int(rng.integers(2, 4))):
            ang = rng.uniform(0, 2 * np.pi)
            p = root + np.array([8.0 * np.cos(ang), 8.0 * np.sin(ang), rng.uniform(-7.0, -2.0)])
            blobs.append(ball(p, rng.uniform(1.2, 2.5), rng.uniform(300.0, 800.0), "aortic_valve"))
    # Mitral annular calcification: a C band 6-8 mm inside the heart from the proximal LCX.
    if rng.uniform() < 0.4:
        lcx = coronaries["LCX"]
        inward = patient.heart_centre - lcx.points
        inward /= np.linalg.norm(inward, axis=1, keepdims=True)
        n = len(lcx.points)
        peak = rng.uniform(300.0, 700.0)
        for i in range(n // 10, n // 2, 3):
            p = lcx.points[i] + inward[i] * (lcx.radii[i] + rng.uniform(6.0, 8.0))
            blobs.append(ball(p, 1.3, peak, "mitral_annulus"))
    # Costal cartilage calcification: specks in the anterior cartilage beside the sternum.
    if rng.uniform() < 0.6:
        for _ in range(int(rng.integers(2, 6))):
            alpha = np.pi - rng.uniform(0.2, 0.45)
            sign = rng.choice([-1.0, 1.0])
            p = chest_wall_point(patient, alpha, sign, rng.uniform(-60.0, 20.0))
            blobs.append(ball(p, rng.uniform(0.8, 1.8), rng.uniform(200.0, 600.0), "costal_cartilage"))
    # Blobs just above 130 HU in the myocardium beside the arteries (noise makes some cross 130).
    for _ in range(int(rng.integers(3, 8))):
        line = coronaries[str(rng.choice(list(coronaries)))]
        i = int(rng.integers(0, len(line.points)))
        inward = patient.heart_centre - line.points[i]
        p = line.points[i] + inward / np.linalg.norm(inward) * (line.radii[i] + 4.0)
        blobs.append(ball(p, rng.uniform(0.8, 1.3), rng.uniform(135.0, 165.0), "near_threshold"))
    return [bl for bl in blobs if in_z(bl.centre)]


def chest_wall_point(
    patient: Patient, alpha: float, sign: float, z: float, depth: float = 21.0
) -> np.ndarray:
    """LPS mm of the rib / costal cartilage line (``depth`` mm under the skin of the body ellipse) at the
    body-polar angle ``alpha`` (0 posterior, pi anterior; ``tissue._paint_ribs``), on the patient's left
    (``sign`` +1) or right (-1), at height ``z``."""
    a, b = patient.body_axes
    rr = np.sqrt((a * np.sin(alpha)) ** 2 + (b * np.cos(alpha)) ** 2)
    scale = (rr - depth) / rr
    return np.array([sign * a * np.sin(alpha) * scale, b * np.cos(alpha) * scale, z])


def render_blobs(
    blobs: list[Blob],
    base: np.ndarray,
    grid: AxialGrid,
    acq: Acquisition,
    owner_hu: np.ndarray,
    owner_id: np.ndarray,
    *,
    first_id: int,
    scale: float = 1.0,
) -> None:
    """Renders ``blobs`` into the claim arrays (in place); blob ``j`` gets id ``first_id + j``.

    Args:
      base: ``(z, y, x)`` noise-free tissue HU under the blobs.
      owner_hu: ``(z, y, x)`` float32, the highest blob HU so far (``-inf`` where none).
      owner_id: ``(z, y, x)`` int32, which blob claims the voxel (0 none).
      scale: size factor for blobs with ``scalable`` set (the risk-category search).
    """
    n_slab = max(3, int(np.ceil(acq.thickness_mm / 0.5)))
    slab = acq.thickness_mm * ((np.arange(n_slab) + 0.5) / n_slab - 0.5)
    for j, blob in enumerate(blobs):
        semi = blob.semi_mm * (scale if blob.scalable else 1.0)
        n_motion = 5 if np.any(blob.motion) else 1
        shifts = np.outer(np.linspace(-0.5, 0.5, n_motion) if n_motion > 1 else [0.0], blob.motion)
        reach = semi.max() + 3 * PSF_SIGMA_MM + np.abs(blob.motion).max() / 2 + acq.thickness_mm / 2
        box = grid.box(blob.centre - reach, blob.centre + reach)
        if box is None:
            continue
        bz, by, bx = box
        frac = np.zeros((bz.stop - bz.start, by.stop - by.start, bx.stop - bx.start), dtype=np.float64)
        dy = grid.ys[None, by, None] - blob.centre[1]
        dx = grid.xs[None, None, bx] - blob.centre[0]
        for dzs in slab:
            dz = grid.zs[bz, None, None] + dzs - blob.centre[2]
            for sh in shifts:
                q = sum(
                    (
                        (
                            blob.axes[i, 0] * (dx - sh[0])
                            + blob.axes[i, 1] * (dy - sh[1])
                            + blob.axes[i, 2] * (dz - sh[2])
                        )
                        / semi[i]
                    )
                    ** 2
                    for i in range(3)
                )
                dist = (np.sqrt(q) - 1.0) * semi.min()
                frac += 0.5 * special.erfc(dist / (np.sqrt(2.0) * PSF_SIGMA_MM))
        frac /= len(slab) * len(shifts)
        sub_base = base[box].astype(np.float64)
        k = int(np.argmax(frac))
        p_max, b_at = frac.flat[k], sub_base.flat[k]
        density = b_at + (blob.target_peak_hu - b_at) / max(p_max, 1e-6)
        blob.density_hu = float(min(density, blob.max_density_hu))
        hu = sub_base * (1.0 - frac) + blob.density_hu * frac
        blob.peak_noise_free_hu = float(hu.max())
        claim = (frac > 0.01) & (hu > owner_hu[box])
        owner_hu[box] = np.where(claim, hu, owner_hu[box]).astype(np.float32)
        owner_id[box] = np.where(claim, first_id + j, owner_id[box])
