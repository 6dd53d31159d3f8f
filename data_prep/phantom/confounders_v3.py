"""Phantom v3 confounders: the bright non-coronary objects real chests hold and v1/v2 lacked.

Each is a set of ``calcium.Blob`` (label 0) rendered like calcium (slab, motion, PSF, partial volume):

- costal cartilage calcification along the cartilage arcs of several rib levels (most adults over 50;
  coarse patches of 250-900 HU in the anterior chest wall beside the sternum, where the v2 model put 1,963
  Agatston points on a real chest scan whose physician score is 0);
- rib ends: the bony tip of each rib where its cartilage starts (cortical bone seen end-on);
- calcified mediastinal and hilar lymph nodes (subcarinal, paratracheal, hilar; 3-10 mm, often
  clustered, 250-1000 HU);
- sternal wires after sternotomy (5-7 steel loops around the sternum; in about 1 in 8 of a cardiac
  cohort here);
- a pacemaker / ICD lead (left subclavian vein, superior vena cava, right atrium, right ventricular apex;
  about 1 in 12).

Metal peaks at 3000 HU (near the top of the 12-bit range) however thin it is: its density may go far
above calcium's 3000 HU cap (``max_density_hu``), so partial volume does not dim it as it dims calcium.
Coronary stents are not drawn: stented patients are scored differently (their calcium score is not
defined in the usual protocols), so a stent would need its own label rather than calcium or background.

World coordinates are LPS mm with z = 0 at the aortic root (``anatomy``).
"""

from __future__ import annotations

import numpy as np

from data_prep.phantom.acquisition import Acquisition
from data_prep.phantom.anatomy import Patient
from data_prep.phantom.calcium import Blob, _frame, chest_wall_point
from data_prep.phantom.tissue import NUM_RIBS, RIB_DROP_MM, RIB_PITCH_MM, RIB_TOP_Z

METAL_DENSITY_HU = 30000.0
# Body-polar angles of the costal cartilage (tissue._paint_ribs draws cartilage beyond pi - 0.5).
CARTILAGE_ALPHA = (np.pi - 0.5, np.pi - 0.12)
WIRE_PROBABILITY, LEAD_PROBABILITY, NODE_PROBABILITY, CARTILAGE_PROBABILITY = 0.12, 0.08, 0.35, 0.85


def plan_confounders_v3(patient: Patient, acq: Acquisition, rng: np.random.Generator) -> list[Blob]:
    """The v3 confounders of one scan (module docstring), inside the scan's z coverage."""
    blobs = _rib_ends(patient, rng)
    if rng.uniform() < CARTILAGE_PROBABILITY:
        blobs += _cartilage_calcification(patient, rng)
    if rng.uniform() < NODE_PROBABILITY:
        blobs += _lymph_nodes(patient, rng)
    if rng.uniform() < WIRE_PROBABILITY:
        blobs += _sternal_wires(patient, rng)
    if rng.uniform() < LEAD_PROBABILITY:
        blobs += _pacemaker_lead(patient, rng)
    zs = acq.slice_z()
    return [b for b in blobs if zs[0] <= b.centre[2] <= zs[-1]]


def _blob(kind, centre, axes, semi, peak, max_density=None) -> Blob:
    extra = {} if max_density is None else {"max_density_hu": max_density}
    return Blob(
        kind,
        None,
        np.asarray(centre, float),
        axes,
        np.asarray(semi, float),
        float(peak),
        np.zeros(3),
        False,
        **extra,
    )


def _rib_z(alpha: float, k: int) -> float:
    """Height (mm) where rib ``k`` crosses the body-polar angle ``alpha`` (``tissue._paint_ribs``)."""
    return RIB_TOP_Z - RIB_DROP_MM * (1.0 - np.cos(alpha)) / 2.0 - k * RIB_PITCH_MM


def _along_arc(patient, k, sign, alpha0, alpha1, step_mm):
    """Points and unit tangents along rib ``k``'s cartilage line from ``alpha0`` to ``alpha1``."""
    a, b = patient.body_axes
    n = max(2, int(abs(alpha1 - alpha0) * 0.5 * (a + b) / step_mm))
    alphas = np.linspace(alpha0, alpha1, n)
    pts = np.stack([chest_wall_point(patient, al, sign, _rib_z(al, k)) for al in alphas])
    t = np.gradient(pts, axis=0)
    return pts, t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)


def _rib_ends(patient, rng) -> list[Blob]:
    """The bony end of each rib, both sides, where its cartilage begins: a short cortical stub."""
    out = []
    for k in range(NUM_RIBS):
        for sign in (-1.0, 1.0):
            alpha = CARTILAGE_ALPHA[0] + rng.uniform(-0.04, 0.04)
            pts, t = _along_arc(patient, k, sign, alpha - 0.05, alpha, 2.0)
            frame = _frame(t[-1], rng)
            out.append(_blob("rib_end", pts[-1], frame, (3.0, 3.0, 2.0), rng.uniform(500.0, 1100.0)))
    return out


def _cartilage_calcification(patient, rng) -> list[Blob]:
    """3-9 patches, each a run of 2-6 overlapping blobs along one rib's cartilage (coarse, 250-900 HU)."""
    out = []
    for _ in range(int(rng.integers(3, 10))):
        k, sign = int(rng.integers(0, NUM_RIBS)), float(rng.choice([-1.0, 1.0]))
        start = rng.uniform(*CARTILAGE_ALPHA)
        length = rng.uniform(0.05, 0.2) * rng.choice([-1.0, 1.0])
        end = float(np.clip(start + length, *CARTILAGE_ALPHA))
        pts, t = _along_arc(patient, k, sign, start, end, 2.5)
        peak = rng.uniform(250.0, 900.0)
        for p, tan in zip(pts[: int(rng.integers(2, 7))], t, strict=False):
            semi = (rng.uniform(1.5, 3.0), rng.uniform(1.0, 3.0), rng.uniform(1.0, 2.5))
            out.append(_blob("costal_cartilage", p, _frame(tan, rng), semi, peak * rng.uniform(0.8, 1.2)))
    return out


def _lymph_nodes(patient, rng) -> list[Blob]:
    """1-3 calcified nodes at mediastinal / hilar stations, each 1-3 blobs (popcorn calcification)."""
    sx, sy = patient.thorax_scale
    stations = np.array(
        [[0.0, 25.0, -5.0], [-12.0, 5.0, 30.0], [-42.0 * sx, 10.0 * sy, -10.0], [45.0 * sx, 15.0 * sy, -10.0]]
    )
    out = []
    for _ in range(int(rng.integers(1, 4))):
        centre = stations[int(rng.integers(0, len(stations)))] + rng.normal(0.0, 5.0, 3)
        size, peak = rng.uniform(1.5, 5.0), rng.uniform(250.0, 1000.0)
        for _ in range(int(rng.integers(1, 4))):
            p = centre + rng.normal(0.0, size * 0.6, 3)
            out.append(
                _blob("lymph_node", p, _frame(rng.normal(size=3), rng), size * rng.uniform(0.5, 1.0, 3), peak)
            )
    return out


def _sternal_wires(patient, rng) -> list[Blob]:
    """5-7 steel loops (wire radius 0.5-0.8 mm) around the sternum at even heights, plus each twist."""
    b = patient.body_axes[1]
    centre_y = -b + 19.0  # tissue's sternum
    out = []
    for z in np.linspace(-70.0, 40.0, int(rng.integers(5, 8))) + rng.normal(0.0, 3.0):
        r = rng.uniform(0.5, 0.8)
        angles = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
        pts = np.stack(
            [17.0 * np.cos(angles), centre_y + 9.0 * np.sin(angles), np.full(angles.size, z)], axis=1
        )
        t = np.roll(pts, -1, axis=0) - np.roll(pts, 1, axis=0)
        for p, tan in zip(pts, t, strict=True):
            out.append(_blob("sternal_wire", p, _frame(tan, rng), (1.6, r, r), 3000.0, METAL_DENSITY_HU))
        out.append(
            _blob(
                "sternal_wire",
                (0.0, centre_y - 10.0, z),
                np.eye(3),
                (1.5, 1.5, 1.5),
                3000.0,
                METAL_DENSITY_HU,
            )
        )
    return out


def _pacemaker_lead(patient, rng) -> list[Blob]:
    """A lead (radius 0.9-1.2 mm) from the left subclavian vein down the superior vena cava through the
    right atrium to the right ventricular apex."""
    u, v, w = (np.asarray(e) for e in (patient.heart_u, patient.heart_v, patient.heart_w))
    a, b, c = patient.heart_axes
    centre = patient.heart_centre
    right_atrium = centre - 0.55 * a * u + 0.6 * c * w
    rv_apex = centre + 0.75 * a * u + 0.35 * b * v
    root = np.asarray(patient.aortic_root)
    path = np.array(
        [
            [75.0, -45.0, 120.0],
            [30.0, -35.0, 80.0],
            root + [-28.0, 0.0, 40.0],
            root + [-30.0, 2.0, 10.0],
            right_atrium,
            0.5 * (right_atrium + rv_apex) + 8.0 * v,
            rv_apex,
        ]
    )
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, s[-1], 2.0)
    pts = np.stack([np.interp(t, s, path[:, i]) for i in range(3)], axis=1)
    tangents = np.gradient(pts, axis=0)
    r = rng.uniform(0.9, 1.2)
    return [
        _blob("pacemaker_lead", p, _frame(tan, rng), (1.8, r, r), 3000.0, METAL_DENSITY_HU)
        for p, tan in zip(pts, tangents, strict=True)
    ]
