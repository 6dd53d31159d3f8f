"""Phantom v3 anatomy: a thorax that fills its field of view, a heart of chambers whose
coronaries run in fat-filled grooves, and lung vessel trees.

Driven by ``docs/realism`` (v1/v2 measured against the real sample): the phantom's body was too small for
its field of view (a real chest FOV is set to the body, about 340-380 mm wide), its heart a small ellipse
in fat where a real gated FOV is filled by the heart (fat fraction within 50 mm of the heart centre 0.08
real, 0.19-0.36 phantom), and its lungs empty.

Sizes (adult thorax, CT anatomy): body 320-385 x 230-290 mm at the heart's level; heart long axis 120-140
mm, transverse 105-125 mm, antero-posterior 95-110 mm, its anterior surface close behind the sternum;
left atrium about 55 x 60 x 70 mm behind the base, right atrium about 60 x 60 x 55 mm to its right;
pulmonary trunk 25-30 mm wide, anterior-left of the aortic root, rising 40-50 mm to its bifurcation under
the arch; epicardial fat fills the atrioventricular and interventricular grooves (5-8 mm around the
coronaries), the fat over the rest of the heart is 1-3 mm. Unenhanced, ventricular blood reads 0-12 HU
lower than myocardium (haematocrit). Lung vessels branch from each hilum, about 6 mm wide there, x0.7
per generation to about 2 mm at the fourth (thinner ones are below a chest CT's resolution at 3 mm slices).

World coordinates are LPS mm with z = 0 at the aortic root (``anatomy``). Geometry only; ``tissue``
renders it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.phantom.anatomy import AV_GROOVE_THETA, Centerline, Patient, _resample, _smooth

NOMINAL_BODY_MM = (160.0, 115.0)  # the v1 body the lung / spine template was drawn for
ANTERIOR_SHIFT = 0.8  # mm the heart moves forward per mm of extra body half-depth
# Fat around each coronary (mm from the vessel wall). v3: the 5-8 mm of a textbook atrioventricular groove.
# v4: 0.5-2.5 mm, because the real sample's lesions sit in far less fat than v3's (fraction of fat within
# 5 mm of a lesion centre: real gated 0.42, v3 0.83; ``data_prep.phantom.realism``'s ``lesion_fat``), and
# a model trained on v3 finds a standard lesion in phantom surroundings and not in a real heart's
# (``calcjax.research.lesion_probe``; docs/experiments/).
GROOVE_FAT_MM = {3: (5.0, 8.0), 4: (0.5, 2.5)}


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in LPS mm: ``centre``, ``axes`` (rows = unit directions) and ``semi_mm``."""

    centre: np.ndarray
    axes: np.ndarray
    semi_mm: np.ndarray


def enlarge(
    patient: Patient,
    rng: np.random.Generator,
    version: int = 3,
    groove_fat_mm: tuple[float, float] | None = None,
) -> Patient:
    """The v3 (or v4) patient: body, lungs and heart at adult sizes (module docstring), grooves and
    chambers on; the coronary fat sleeve (mm) uniform in ``groove_fat_mm`` (default :data:`GROOVE_FAT_MM`
    of ``version``), one uniform draw whatever the range, so a v4 scan is its v3 twin with a thinner
    sleeve."""
    s = float(rng.uniform(1.0, 1.2))
    a = NOMINAL_BODY_MM[0] * s
    b = NOMINAL_BODY_MM[1] * s * float(rng.uniform(0.95, 1.1))
    heart = (
        float(rng.uniform(60.0, 70.0)),
        float(rng.uniform(48.0, 55.0)),
        float(rng.uniform(52.0, 62.0)),
    )
    # The heart lies against the anterior chest wall whatever the body's depth: move it (and the aortic
    # root everything hangs from) forward with the sternum.
    x0, y0, z0 = patient.aortic_root
    return dataclasses.replace(
        patient,
        aortic_root=(x0, y0 - ANTERIOR_SHIFT * (b - NOMINAL_BODY_MM[1]), z0),
        body_axes=(a, b),
        heart_axes=heart,
        thorax_scale=(a / NOMINAL_BODY_MM[0], b / NOMINAL_BODY_MM[1]),
        groove_fat_mm=float(rng.uniform(*(groove_fat_mm or GROOVE_FAT_MM[version]))),
        pericardial_fat_mm=float(rng.uniform(1.0, 3.0)),
        chambers=True,
        lungs_fill_cavity=True,
        cavity_contrast_hu=float(rng.uniform(0.0, 12.0)),
    )


def chambers(patient: Patient) -> list[Ellipsoid]:
    """Left atrium, right atrium (blood, painted over the heart) in the heart frame (u apex, v anterior,
    w patient's right)."""
    a, b, c = patient.heart_axes
    u, v, w = (np.asarray(e) for e in (patient.heart_u, patient.heart_v, patient.heart_w))
    frame = np.stack([u, v, w])
    centre = patient.heart_centre
    left_atrium = Ellipsoid(
        centre - 0.85 * a * u - 0.55 * b * v - 0.1 * c * w, frame, np.array([28.0, 30.0, 36.0])
    )
    right_atrium = Ellipsoid(
        centre - 0.65 * a * u - 0.05 * b * v + 0.75 * c * w, frame, np.array([30.0, 30.0, 28.0])
    )
    return [left_atrium, right_atrium]


def ventricular_cavity(patient: Patient) -> Ellipsoid:
    """The left ventricular cavity: inside the heart, toward the apex and the patient's left."""
    a, b, c = patient.heart_axes
    u, v, w = (np.asarray(e) for e in (patient.heart_u, patient.heart_v, patient.heart_w))
    return Ellipsoid(
        patient.heart_centre + 0.1 * a * u - 0.2 * c * w,
        np.stack([u, v, w]),
        np.array([0.62 * a, 0.55 * b, 0.45 * c]),
    )


def pulmonary_trunk(patient: Patient, step: float = 2.0) -> Centerline:
    """From the right ventricular outflow, anterior-left of the aortic root, up and back under the arch."""
    root = np.asarray(patient.aortic_root)
    pts = root + np.array([[14.0, -22.0, -8.0], [22.0, -20.0, 12.0], [28.0, -8.0, 32.0], [30.0, 8.0, 42.0]])
    smooth = _smooth(pts, passes=2)
    p, r = _resample(smooth, np.full(len(smooth), 13.0), step)
    return Centerline("pulmonary_trunk", p, r)


def posterior_groove(patient: Patient, step: float = 1.0) -> Centerline:
    """The posterior interventricular groove: from the crux (phi = pi on the AV ring) toward the apex;
    ``radii`` = 0 (a fat line without a vessel)."""
    theta = np.linspace(AV_GROOVE_THETA, 0.3 * np.pi, 24)
    pts = patient.heart_surface(theta, np.full(theta.size, np.pi), np.zeros(theta.size))
    p, r = _resample(pts, np.zeros(len(pts)), step)
    return Centerline("posterior_groove", p, r)


def lung_vessel_trees(patient: Patient, rng: np.random.Generator, step: float = 1.0) -> list[Centerline]:
    """Branching vessel trees from both hila (LPS mm; radius 3 mm at the hilum, x0.7 per generation, 4
    generations; each trunk heads laterally with a random tilt, each branch splits in two at 25-45 deg)."""
    sx, sy = patient.thorax_scale
    hila = (np.array([-45.0 * sx, 8.0 * sy, -15.0]), np.array([48.0 * sx, 12.0 * sy, -15.0]))
    out: list[Centerline] = []
    for side, hilum in zip((-1.0, 1.0), hila, strict=True):
        for _ in range(int(rng.integers(5, 8))):
            d = np.array([side, rng.uniform(-0.5, 0.6), rng.uniform(-0.9, 0.9)])
            _branch(hilum, d / np.linalg.norm(d), 3.0, 30.0, 0, rng, step, out)
    return out


def _branch(start, direction, radius, length, generation, rng, step, out) -> None:
    end = start + direction * length
    mid = 0.5 * (start + end) + rng.normal(0.0, 0.12 * length, 3)
    p, r = _resample(np.stack([start, mid, end]), np.array([radius, radius * 0.92, radius * 0.85]), step)
    out.append(Centerline("lung_vessel", p, r))
    if generation == 3:
        return
    for sign in (-1.0, 1.0):
        perp = np.cross(direction, rng.normal(size=3))
        perp /= np.linalg.norm(perp)
        angle = np.radians(rng.uniform(25.0, 45.0))
        d = np.cos(angle) * direction + sign * np.sin(angle) * perp
        _branch(
            end,
            d / np.linalg.norm(d),
            radius * 0.7,
            length * rng.uniform(0.65, 0.85),
            generation + 1,
            rng,
            step,
            out,
        )
