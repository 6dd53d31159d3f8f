"""Patient anatomy of the phantom: body, heart frame, aorta and the four coronary centerlines.

Geometry only (no rendering). World coordinates are DICOM LPS in mm (x to the patient's left, y to
posterior, z to superior) with the origin at the aortic root (z = 0 at the level of the coronary ostia).

Anatomy (Dodge et al., Circulation 1992): LM 4.5 +- 0.5 mm diameter, proximal LAD
3.7 +- 0.4 mm tapering to 1.9 +- 0.4 mm, LCX 3.4-4.2 mm, proximal RCA 3.9 +- 0.6 mm (right-dominant).
The LM leaves the left coronary sinus, runs 5-15 mm leftward and splits into the LAD (anterior
interventricular groove to the apex) and the LCX (left atrioventricular groove, beside the mitral annulus);
the RCA leaves the right coronary sinus and runs in the right atrioventricular groove to the crux.

The heart is an ellipsoid whose long axis points from the base (posterior, right, superior) to the apex
(anterior, left, inferior); the coronaries run on its surface in the epicardial fat, parameterised by the
ellipsoid angles theta (0 at the apex, pi at the base) and phi (0 anterior, +pi/2 the patient's right,
-pi/2 the left, pi posterior at the crux).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calcjax.core.agatston import ARTERIES

ARTERY_LABELS = {name: i + 1 for i, name in enumerate(ARTERIES)}  # label value = index + 1
HEART_DROP = np.array([0.0, 0.0, -20.0])  # mm; puts the left AV groove at the level of the root
AV_GROOVE_THETA = 0.74 * np.pi


@dataclasses.dataclass(frozen=True)
class Centerline:
    """A vessel centerline resampled at about ``step`` mm.

    Attributes:
      name: vessel name (LM, LAD, LCX, RCA, aorta).
      points: ``(n, 3)`` LPS mm.
      radii: ``(n,)`` lumen radius in mm.
    """

    name: str
    points: np.ndarray
    radii: np.ndarray

    def tangents(self) -> np.ndarray:
        """``(n, 3)`` unit tangents (direction of increasing index)."""
        t = np.gradient(self.points, axis=0)
        return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)

    def length_mm(self) -> float:
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())


@dataclasses.dataclass(frozen=True)
class Patient:
    """Per-scan anatomy parameters (mm, LPS, z = 0 at the aortic root).

    Attributes:
      body_axes: body ellipse semi-axes (x, y).
      aortic_root: LPS centre of the aortic root.
      heart_axes: heart ellipsoid semi-axes (long, anterior, side).
      heart_u, heart_v, heart_w: heart frame (u toward the apex, v anterior, w to the patient's right).
      vessel_scale: factor on all coronary diameters.
      cancellous_hu: mean HU of vertebral cancellous bone (150-300, crossing 130 HU).
      cortical_hu: HU of cortical bone (800-1500).
      z_diaphragm: z (mm) of the right hemidiaphragm dome; the left one lies 15 mm lower.
      thorax_scale: (x, y) factors on the lungs' and the spine's in-plane positions and sizes (v3 scales
        them with the body; 1 before).
      groove_fat_mm: fat around each coronary lumen (mm): v1/v2 a 3 mm sleeve, v3 a 5-8 mm groove.
      pericardial_fat_mm: thickness of the fat shell around the heart (mm).
      chambers: v3 only: atria, pulmonary trunk and ventricular cavity are drawn (``anatomy_v3``).
      lungs_fill_cavity: v3 only: the lungs fill the thoracic cavity beside a central mediastinal strip, so
        they meet the heart (before: two fixed ellipses with mediastinal fat between them and the heart).
      cavity_contrast_hu: how much lower the ventricular blood reads than the myocardium (HU; v3).
    """

    body_axes: tuple[float, float]
    aortic_root: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    heart_u: tuple[float, float, float]
    heart_v: tuple[float, float, float]
    heart_w: tuple[float, float, float]
    vessel_scale: float
    cancellous_hu: float
    cortical_hu: float
    z_diaphragm: float
    thorax_scale: tuple[float, float] = (1.0, 1.0)
    groove_fat_mm: float = 3.0
    pericardial_fat_mm: float = 4.0
    chambers: bool = False
    lungs_fill_cavity: bool = False
    cavity_contrast_hu: float = 0.0

    @property
    def heart_centre(self) -> np.ndarray:
        # The base sits around the aortic root; the AV groove ring passes 10-20 mm from the root's wall.
        return np.asarray(self.aortic_root) + 0.8 * self.heart_axes[0] * np.asarray(self.heart_u) + HEART_DROP

    def heart_surface(self, theta: np.ndarray, phi: np.ndarray, lift_mm: np.ndarray) -> np.ndarray:
        """LPS points on the heart ellipsoid at angles (theta, phi), lifted ``lift_mm`` along the normal."""
        a, b, c = self.heart_axes
        u, v, w = (np.asarray(e) for e in (self.heart_u, self.heart_v, self.heart_w))
        theta, phi = np.asarray(theta)[:, None], np.asarray(phi)[:, None]
        ct, st, cp, sp = np.cos(theta), np.sin(theta), np.cos(phi), np.sin(phi)
        surf = self.heart_centre + a * ct * u + b * st * cp * v + c * st * sp * w
        normal = ct / a * u + st * cp / b * v + st * sp / c * w
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        return surf + normal * np.asarray(lift_mm)[:, None]


def sample_patient(rng: np.random.Generator) -> Patient:
    """Draws one adult thorax with small variations of size, heart orientation and bone density."""
    s = float(rng.uniform(0.92, 1.08))
    u = np.array([0.5, -0.55, -0.67]) + rng.normal(0.0, 0.04, 3)
    u /= np.linalg.norm(u)
    anterior = np.array([0.0, -1.0, 0.0])
    v = anterior - anterior.dot(u) * u
    v /= np.linalg.norm(v)
    w = np.cross(u, v)  # points to the patient's right (x < 0)
    return Patient(
        body_axes=(160.0 * s, 115.0 * s),
        aortic_root=(float(rng.uniform(-4.0, 0.0)), float(rng.uniform(-12.0, -8.0)), 0.0),
        heart_axes=(62.0 * s, 50.0 * s, 46.0 * s),
        heart_u=tuple(u),
        heart_v=tuple(v),
        heart_w=tuple(w),
        vessel_scale=float(rng.uniform(0.9, 1.1)),
        cancellous_hu=float(rng.uniform(160.0, 260.0)),
        cortical_hu=float(rng.uniform(900.0, 1300.0)),
        z_diaphragm=float(rng.uniform(-105.0, -95.0)),
    )


def _resample(points: np.ndarray, radii: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, s[-1], max(int(np.ceil(s[-1] / step)) + 1, 2))
    pts = np.stack([np.interp(t, s, points[:, i]) for i in range(3)], axis=1)
    return pts, np.interp(t, s, radii)


def _smooth(points: np.ndarray, passes: int = 3) -> np.ndarray:
    """Chaikin-like smoothing that keeps both end points."""
    p = points
    for _ in range(passes):
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        p = np.concatenate([p[:1], np.stack([q, r], axis=1).reshape(-1, 3), p[-1:]])
    return p


def coronary_centerlines(patient: Patient, step: float = 0.5) -> dict[str, Centerline]:
    """The LM, LAD, LCX and RCA centerlines (LPS mm, radii in mm), resampled every ``step`` mm."""
    k = patient.vessel_scale
    root = np.asarray(patient.aortic_root)
    ao_r = 14.0
    # Ostia on the aortic root wall: left sinus toward the patient's left, right sinus anterior-right.
    lm_origin = root + ao_r * np.array([0.97, -0.24, 0.0]) + np.array([0.0, 0.0, -1.0])
    rca_origin = root + ao_r * np.array([-0.32, -0.95, 0.0]) + np.array([0.0, 0.0, -3.0])

    def surface_path(theta, phi, radius):
        theta, phi, radius = (np.asarray(x, dtype=float) for x in (theta, phi, radius))
        return patient.heart_surface(theta, phi, radius + 1.0)

    # Bifurcation: the point of the left AV groove nearest the LM ostium.
    phis = np.linspace(-1.6, -0.2, 57)
    ring = surface_path(np.full(phis.size, AV_GROOVE_THETA), phis, np.full(phis.size, 2.25 * k))
    phi_b = float(phis[np.argmin(np.linalg.norm(ring - lm_origin, axis=1))])
    bifurcation = ring[np.argmin(np.linalg.norm(ring - lm_origin, axis=1))]
    lm_pts = np.stack([lm_origin, 0.5 * (lm_origin + bifurcation), bifurcation])
    lm_r = np.full(3, 2.25 * k)

    n = 24
    t = np.linspace(0.0, 1.0, n)
    lad_r = k * (1.85 - 0.9 * t)
    lad_phi = phi_b + (-0.35 - phi_b) * np.minimum(t / 0.25, 1.0)
    lad_surface = surface_path(AV_GROOVE_THETA - np.pi * 0.68 * t, lad_phi, lad_r)

    lcx_r = k * (1.9 - 0.85 * t)
    lcx_surface = surface_path(AV_GROOVE_THETA - np.pi * 0.06 * t, phi_b - (2.8 + phi_b) * t, lcx_r)

    rca_r = k * (1.95 - 0.75 * t)
    rca_theta = np.where(t < 0.8, AV_GROOVE_THETA, AV_GROOVE_THETA - np.pi * (t - 0.8) * 1.0)
    rca_surface = surface_path(rca_theta, 0.3 + 2.8 * np.minimum(t / 0.8, 1.0), rca_r)
    rca_pts = np.concatenate([rca_origin[None], rca_surface])
    rca_r = np.concatenate([[1.95 * k], rca_r])

    out = {}
    for name, pts, radii in (
        ("LM", lm_pts, lm_r),
        ("LAD", lad_surface, lad_r),
        ("LCX", lcx_surface, lcx_r),
        ("RCA", rca_pts, rca_r),
    ):
        sm = _smooth(pts, passes=2) if len(pts) > 3 else pts
        r = np.interp(np.linspace(0, 1, len(sm)), np.linspace(0, 1, len(radii)), radii)
        p, rr = _resample(sm, r, step)
        out[name] = Centerline(name, p, rr)
    return out


def aorta_centerline(patient: Patient, z_bottom: float, step: float = 2.0) -> Centerline:
    """Ascending aorta, arch and descending aorta down to ``z_bottom`` (LPS mm; radius 14 -> 11 mm)."""
    root = np.asarray(patient.aortic_root)
    pts = np.array(
        [
            root + (0.0, 0.0, -4.0),
            root + (-5.0, -3.0, 25.0),
            root + (-6.0, 2.0, 50.0),
            (5.0, 15.0, 68.0),
            (22.0, 30.0, 60.0),
            (25.0, 32.0, 40.0),
            (20.0, 34.0, min(z_bottom, -120.0) - 20.0),
        ]
    )
    radii = np.array([14.0, 15.0, 14.0, 13.0, 12.0, 11.5, 11.0])
    sm = _smooth(pts, passes=3)
    r = np.interp(np.linspace(0, 1, len(sm)), np.linspace(0, 1, len(radii)), radii)
    p, rr = _resample(sm, r, step)
    return Centerline("aorta", p, rr)
