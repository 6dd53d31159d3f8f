r"""The QRM cardio calcification insert, found and scored from HU alone (no model): a real-scanner known
answer for ``calcjax.core.agatston``'s Agatston, volume and mass.

The insert (QRM cardiac calcification insert): nine hydroxyapatite (HA) cylinders, three densities (200,
400, 800 mg HA/cm^3) times three sizes (diameter = length = 5, 3, 1 mm), laid out on three rays 120 degrees
apart from the insert's axis: each ray holds one density, the large cylinder outermost, the medium and the
small ones equally spaced towards the axis; a 200 mg HA/cm^3 calibration rod runs along the axis in another
z range. How they are found, in the scan's voxels (``hu`` ``(z, y, x)``, ``spacing`` ``(dz, dy, dx)`` mm):

1. compact bright objects: 3D components of HU >= 130 no longer than ``MAX_EXTENT_MM`` along any axis and at
   least ``MIN_OBJECT_MM3`` in volume (noise specks are a few voxels; the spine and the shell are long);
2. the three large inserts: of the triples of objects that sit on a circle 120 degrees apart (equal radii
   and angles within tolerances), the one with the largest total volume (phantom material just above
   130 HU makes many small objects, never three large ones so placed); its centroid is the insert's axis;
3. the insert spacing along a ray: from the objects found on the rays inside the large ones (the medium
   inserts; at least one must be visible); the small inserts lie one more spacing inwards (the 1 mm ones are
   often invisible, and their region is scored all the same, which is the point of the test);
4. densities: rays ranked by the mean HU of their large insert's core (low, medium, high);
5. each insert's region: a cylinder of radius ``size / 2 + margin_mm`` (partial volume and blooming) in
   plane, over the slices of the large inserts plus one on each side;
6. the mass calibration factor as the source study derives it: the calibration rod's density over its mean
   HU, ``CALIBRATION_ROD_MG_PER_CM3 / 1000 / mean HU`` in mg per (HU x mm^3), from a disc of radius
   ``ROD_CORE_RADIUS_MM`` around the axis over the rod's slices without its two end slices.

  python -m calcjax.data.qrm DICOM_DIR     # prints one row per insert
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import ndimage

from calcjax.core import agatston

DENSITIES_MG_PER_CM3 = {"low": 200.0, "medium": 400.0, "high": 800.0}
SIZES_MM = {"large": 5.0, "medium": 3.0, "small": 1.0}
CALIBRATION_ROD_MG_PER_CM3 = 200.0
MAX_EXTENT_MM = 12.0
MIN_OBJECT_MM3 = 15.0
ROD_CORE_RADIUS_MM = 5.0
RADIUS_TOLERANCE = 0.15  # relative spread of the three large inserts' radii
ANGLE_TOLERANCE_DEG = 15.0


class InsertNotFoundError(ValueError):
    """The scan does not show the insert's layout (the reason says which step failed)."""


@dataclasses.dataclass(frozen=True)
class Insert:
    """One insert: ``density`` / ``size`` names, ``centre_yx`` (voxels), ``slices`` (z range, end
    exclusive), ``diameter_mm``, ``density_mg_per_cm3`` and its physical mass in mg."""

    density: str
    size: str
    centre_yx: tuple[float, float]
    slices: tuple[int, int]

    @property
    def diameter_mm(self) -> float:
        return SIZES_MM[self.size]

    @property
    def density_mg_per_cm3(self) -> float:
        return DENSITIES_MG_PER_CM3[self.density]

    @property
    def physical_mass_mg(self) -> float:
        r = self.diameter_mm / 2
        return self.density_mg_per_cm3 / 1000.0 * np.pi * r * r * self.diameter_mm


def _compact_objects(hu: np.ndarray, spacing) -> list[dict]:
    components, n = ndimage.label(hu >= agatston.CALCIUM_THRESHOLD_HU)
    voxel_mm3 = float(np.prod(spacing))
    out = []
    for i, sl in enumerate(ndimage.find_objects(components), start=1):
        extent = [(s.stop - s.start) * d for s, d in zip(sl, spacing, strict=True)]
        if max(extent) > MAX_EXTENT_MM:
            continue
        mask = components[sl] == i
        if mask.sum() * voxel_mm3 < MIN_OBJECT_MM3:
            continue
        zz, yy, xx = np.nonzero(mask)
        out.append(
            {
                "yx": np.array([yy.mean() + sl[1].start, xx.mean() + sl[2].start]),
                "z": (sl[0].start, sl[0].stop),
                "volume": mask.sum() * voxel_mm3,
                "mean_hu": float(hu[sl][mask].mean()),
            }
        )
    return out


def _large_triple(objects: list[dict]) -> tuple[list[dict], np.ndarray]:
    best = None
    for triple in itertools.combinations(objects, 3):
        pts = np.stack([o["yx"] for o in triple])
        centre = pts.mean(axis=0)
        radii = np.linalg.norm(pts - centre, axis=1)
        if radii.min() <= 0 or (radii.max() - radii.min()) / radii.mean() > RADIUS_TOLERANCE:
            continue
        angles = np.sort(np.degrees(np.arctan2(*(pts - centre).T[::-1])))
        gaps = np.diff(np.concatenate([angles, angles[:1] + 360]))
        if np.abs(gaps - 120).max() > ANGLE_TOLERANCE_DEG:
            continue
        volume = sum(o["volume"] for o in triple)
        if best is None or volume > best[0]:
            best = (volume, list(triple), centre)
    if best is None:
        raise InsertNotFoundError("no three bright objects 120 degrees apart on a circle (the large inserts)")
    return best[1], best[2]


def find_inserts(hu: np.ndarray, spacing) -> tuple[list[Insert], np.ndarray]:
    """The nine inserts (module docstring) and the insert's axis ``(y, x)`` in voxels."""
    objects = _compact_objects(hu, spacing)
    large, centre = _large_triple(objects)
    pixel = float(spacing[1])
    steps = []
    for o in large:
        r_large = np.linalg.norm(o["yx"] - centre)
        u = (o["yx"] - centre) / r_large
        for other in objects:
            if any(other is x for x in large):
                continue
            d = other["yx"] - centre
            along, across = float(d @ u), abs(float(d[0] * u[1] - d[1] * u[0]))
            if 0 < along < r_large and across * pixel < 2.0:
                steps.append(r_large - along)
    if not steps:
        raise InsertNotFoundError("no medium insert found on the rays of the large ones")
    step = float(np.median(steps))
    z0 = min(o["z"][0] for o in large) - 1
    z1 = max(o["z"][1] for o in large) + 1
    slices = (max(z0, 0), min(z1, hu.shape[0]))
    ranked = sorted(large, key=lambda o: o["mean_hu"])
    inserts = []
    for density, o in zip(("low", "medium", "high"), ranked, strict=True):
        r_large = np.linalg.norm(o["yx"] - centre)
        u = (o["yx"] - centre) / r_large
        for k, size in enumerate(("large", "medium", "small")):
            yx = centre + u * (r_large - k * step)
            inserts.append(Insert(density, size, (float(yx[0]), float(yx[1])), slices))
    return inserts, centre


def calibration_factor(hu: np.ndarray, spacing, centre_yx) -> tuple[float, float]:
    """``(mg per HU x mm^3, mean HU of the rod core)`` from the calibration rod on the insert's axis."""
    components, _ = ndimage.label(hu >= agatston.CALCIUM_THRESHOLD_HU)
    cy, cx = (int(round(v)) for v in centre_yx)
    on_axis = np.unique(components[:, cy, cx])
    on_axis = on_axis[on_axis > 0]
    if on_axis.size == 0:
        raise InsertNotFoundError("no calibration rod (HU >= 130) on the insert's axis")
    sizes = [(components == c).sum() for c in on_axis]
    rod = components == on_axis[int(np.argmax(sizes))]
    zs = np.flatnonzero(rod.any(axis=(1, 2)))
    core_slices = range(zs.min() + 1, zs.max())  # the end slices are partial volume
    if len(core_slices) < 1:
        raise InsertNotFoundError("calibration rod shorter than three slices")
    disc = _disc(hu.shape[1:], centre_yx, spacing, ROD_CORE_RADIUS_MM)
    mean_hu = float(np.mean([hu[z][disc].mean() for z in core_slices]))
    return CALIBRATION_ROD_MG_PER_CM3 / 1000.0 / mean_hu, mean_hu


def _disc(shape_yx, centre_yx, spacing, radius_mm: float) -> np.ndarray:
    """Boolean ``(y, x)`` disc of ``radius_mm`` around ``centre_yx`` (voxels), in-plane spacing from
    ``spacing`` ``(dz, dy, dx)``."""
    yy, xx = np.mgrid[: shape_yx[0], : shape_yx[1]]
    r2 = ((yy - centre_yx[0]) * spacing[1]) ** 2 + ((xx - centre_yx[1]) * spacing[2]) ** 2
    return r2 <= radius_mm**2


def insert_region(shape, insert: Insert, spacing, margin_mm: float) -> np.ndarray:
    """Boolean ``(z, y, x)`` cylinder of radius ``diameter / 2 + margin_mm`` around ``insert``."""
    disc = _disc(shape[1:], insert.centre_yx, spacing, insert.diameter_mm / 2 + margin_mm)
    out = np.zeros(shape, bool)
    out[insert.slices[0] : insert.slices[1]] = disc
    return out


def score_inserts(hu: np.ndarray, spacing, *, margin_mm: float = 1.5, mass_calibration=None) -> list[dict]:
    """One row per insert: density, size, Agatston, volume (mm^3), mass (mg; with ``mass_calibration``,
    default: derived from the rod) and the physical mass, scored by ``calcjax.core.agatston.score`` on the
    insert's region (labels = 1 inside it)."""
    inserts, centre = find_inserts(hu, spacing)
    factor = mass_calibration if mass_calibration is not None else calibration_factor(hu, spacing, centre)[0]
    rows = []
    for ins in inserts:
        labels = insert_region(hu.shape, ins, spacing, margin_mm).astype(np.uint8)
        s = agatston.score(hu, labels, spacing, mass_calibration=factor)
        rows.append(
            {
                "density": ins.density,
                "size": ins.size,
                "agatston": s["agatston"],
                "volume_mm3": s["volume_mm3"],
                "mass_mg": s["mass_mg"],
                "physical_mass_mg": ins.physical_mass_mg,
                "mass_calibration": factor,
            }
        )
    return rows


def main(argv):  # pragma: no cover - a thin printer over score_inserts
    from calcjax.io import dicom

    if len(argv) != 2:
        raise SystemExit("usage: python -m calcjax.data.qrm DICOM_DIR")
    vol = dicom.read_series(argv[1])
    rows = score_inserts(vol.hu.astype(np.float32), vol.spacing)
    print(f"mass calibration factor {rows[0]['mass_calibration']:.6g} mg/(HU mm^3)")
    print("density  size    Agatston  volume_mm3  mass_mg  physical_mg")
    for r in rows:
        print(
            f"{r['density']:<8} {r['size']:<7} {r['agatston']:8.1f} {r['volume_mm3']:11.1f} "
            f"{r['mass_mg']:8.2f} {r['physical_mass_mg']:12.2f}"
        )


if __name__ == "__main__":
    import sys

    main(sys.argv)
