"""Noise-free tissue HU of the phantom thorax, rendered on the acquisition's voxel grid.

HU values (unenhanced CT at 120 kVp): air -1000; lung -850 with texture +-50; fat -100 (subcutaneous,
mediastinal, epicardial); muscle +50; blood and myocardium +40 to +50 with no visible boundary without
contrast; vertebral cancellous bone 150-300 (crossing the 130 HU calcium threshold); cortical bone 800-1500;
ribs and sternum with partial volume; costal cartilage ~+110; liver +55 below the right hemidiaphragm.

Edges are soft ramps one pixel wide (partial volume). The output is float32 ``(z, y, x)`` with z ascending.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data_prep.phantom import anatomy_v3
from data_prep.phantom.acquisition import Acquisition
from data_prep.phantom.anatomy import Centerline, Patient

AIR, LUNG, FAT, MUSCLE, BLOOD, CARTILAGE, LIVER, CSF = -1000.0, -850.0, -100.0, 50.0, 42.0, 110.0, 55.0, 10.0
RIB_TOP_Z, RIB_PITCH_MM, RIB_DROP_MM, NUM_RIBS = 150.0, 27.0, 60.0, 12
VERTEBRA_PITCH_MM, DISC_MM = 26.0, 6.0
LUNG_APEX_Z = 140.0
# v3: half-width (mm) of the mediastinal strip between the lungs where the heart does not fill it: the
# anterior junction line (y < -20 mm) to the posterior mediastinum around the spine (y > 0).
MEDIASTINUM_HALF_MM = (4.0, 18.0)
LUNG_VESSEL_BELOW_HU = -500.0  # v3 lung vessels are painted only where the tissue reads below this


@dataclasses.dataclass(frozen=True)
class AxialGrid:
    """Voxel-centre coordinates of an axial acquisition (LPS mm): ``zs`` ascending, ``ys``, ``xs``."""

    zs: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    pixel_mm: float

    @classmethod
    def from_acquisition(cls, acq: Acquisition) -> AxialGrid:
        off = (np.arange(acq.size) - (acq.size - 1) / 2.0) * acq.pixel_mm
        cx, cy = acq.fov_centre_xy
        return cls(acq.slice_z(), cy + off, cx + off, acq.pixel_mm)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the LPS box [lo, hi] (x, y, z order), or None."""
        out = []
        for axis, coords in ((2, self.zs), (1, self.ys), (0, self.xs)):
            a = int(np.searchsorted(coords, lo[axis], side="left"))
            b = int(np.searchsorted(coords, hi[axis], side="right"))
            if b <= a:
                return None
            out.append(slice(a, b))
        return tuple(out)


def _ramp(signed_mm: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator: 1 well inside (negative distance), 0 outside, linear over ``width`` mm."""
    return np.clip(0.5 - signed_mm / width, 0.0, 1.0)


def _ellipse_distance(x, y, cx, cy, a, b):
    """Approximate signed distance (mm) to an axis-aligned ellipse; negative inside."""
    rho = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return (rho - 1.0) * np.sqrt(a * b)


def _paint(hu: np.ndarray, weight: np.ndarray, value) -> None:
    hu += weight * (value - hu)


def tube_distance(grid: AxialGrid, vessels: list[Centerline], reach_mm: float) -> np.ndarray:
    """Distance (mm) from each voxel centre to the nearest vessel wall (negative inside the lumen).

    Voxels farther than ``reach_mm`` from every wall get ``+inf``. Union of balls along the resampled
    centerlines; each ball is evaluated only in its bounding box.
    """
    d = np.full((grid.zs.size, grid.ys.size, grid.xs.size), np.inf, dtype=np.float32)
    for vessel in vessels:
        for p, r in zip(vessel.points, vessel.radii, strict=True):
            reach = r + reach_mm
            box = grid.box(p - reach, p + reach)
            if box is None:
                continue
            bz, by, bx = box
            dist = np.sqrt(
                (grid.zs[bz, None, None] - p[2]) ** 2
                + (grid.ys[None, by, None] - p[1]) ** 2
                + (grid.xs[None, None, bx] - p[0]) ** 2
            ).astype(np.float32) - np.float32(r)
            np.minimum(d[box], dist, out=d[box])
    return d


def _lung_texture_tiles(shape: tuple[int, int], pixel_mm: float, rng: np.random.Generator, n: int = 6):
    """Smooth random fields (unit SD) for lung parenchyma; slices blend neighbouring tiles."""
    tiles = []
    for _ in range(n):
        t = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=2.0 / pixel_mm)
        tiles.append(t / (t.std() + 1e-6))
    return np.stack(tiles)


def render_tissue(
    acq: Acquisition,
    patient: Patient,
    coronaries: list[Centerline],
    aorta: Centerline,
    rng: np.random.Generator,
    lung_vessels: Sequence[Centerline] = (),
) -> np.ndarray:
    """Noise-free HU volume ``(z, y, x)`` float32 of the thorax for ``acq``.

    Phantom v3 (``patient.chambers``, ``anatomy_v3``) adds the atria, the ventricular cavity, the
    pulmonary trunk and the posterior interventricular groove; ``lung_vessels`` (v3) are painted as blood
    where the lungs are.
    """
    grid = AxialGrid.from_acquisition(acq)
    w = grid.pixel_mm
    x, y = np.meshgrid(grid.xs, grid.ys)  # (y, x) arrays of LPS mm
    a, b = patient.body_axes

    # In-plane template shared by all slices.
    tmpl = np.full(x.shape, AIR, dtype=np.float32)
    d_body = _ellipse_distance(x, y, 0.0, 0.0, a, b)
    _paint(tmpl, _ramp(d_body, w), FAT)
    _paint(tmpl, _ramp(_ellipse_distance(x, y, 0.0, 0.0, a - 14, b - 14), w), MUSCLE)
    cavity = _ramp(_ellipse_distance(x, y, 0.0, 0.0, a - 28, b - 26), w)
    _paint(tmpl, cavity, FAT - 10)
    for sx in (-1.0, 1.0):
        _paint(tmpl, _ramp(_ellipse_distance(x, y, 38 * sx, b - 30, 26, 17), w), MUSCLE)
    tx, ty = patient.thorax_scale  # 1 before v3: the template's mm as drawn for the v1 body
    lung_r = _ramp(_ellipse_distance(x, y, -70.0 * tx, 10.0 * ty, 66.0 * tx, 90.0 * ty), w) * cavity
    lung_l = _ramp(_ellipse_distance(x, y, 76.0 * tx, 15.0 * ty, 62.0 * tx, 86.0 * ty), w) * cavity
    if patient.lungs_fill_cavity:  # v3: the heart, painted later, then meets the lungs
        pleura = _ramp(_ellipse_distance(x, y, 0.0, 0.0, a - 31, b - 29), w)
        half = np.clip(MEDIASTINUM_HALF_MM[0] + (y + 20.0) * 0.7, *MEDIASTINUM_HALF_MM)
        lung_r = pleura * _ramp(x + half, w)
        lung_l = pleura * _ramp(half - x, w)
    esophagus = _ramp(_ellipse_distance(x, y, 4.0, 28.0, 6.0, 6.0), w)
    vb = _ellipse_distance(x, y, 0.0, 55.0 * ty, 19.0, 16.0)
    vb_out, vb_in = _ramp(vb, w), _ramp(vb + 1.5, w)
    canal = _ramp(_ellipse_distance(x, y, 0.0, 79.0 * ty, 8.0, 8.0), w)
    arch = _ramp(_ellipse_distance(x, y, 0.0, 79.0 * ty, 13.0, 13.0), w)
    posterior_bone = np.maximum.reduce(
        [
            arch,
            _ramp(_ellipse_distance(x, y, 0.0, 98.0 * ty, 5.0, 10.0), w),
            _ramp(_ellipse_distance(x, y, -22.0, 78.0 * ty, 10.0, 5.0), w),
            _ramp(_ellipse_distance(x, y, 22.0, 78.0 * ty, 10.0, 5.0), w),
        ]
    )
    sternum_d = _ellipse_distance(x, y, 0.0, -b + 19.0, 14.0, 6.0)
    trachea = _ramp(_ellipse_distance(x, y, 0.0, 10.0, 9.0, 9.0), w)
    trachea_wall = _ramp(_ellipse_distance(x, y, 0.0, 10.0, 11.0, 11.0), w)

    # Polar frame of the body ellipse for ribs: alpha = 0 posterior, +-pi anterior; depth from the skin.
    alpha = np.arctan2(x / a, y / b)
    depth = -d_body
    rib_ring = (depth > 10.0) & (depth < 34.0) & (np.abs(alpha) > 0.25)
    ring_idx = np.nonzero(rib_ring)
    ring_alpha, ring_depth = alpha[ring_idx], depth[ring_idx]

    tiles = _lung_texture_tiles(x.shape, w, rng)
    canc, cort = patient.cancellous_hu, patient.cortical_hu
    bone_texture = ndimage.gaussian_filter(rng.standard_normal(x.shape).astype(np.float32), 1.0 / w)
    bone_texture *= 25.0 / (bone_texture.std() + 1e-6)

    vol = np.empty((grid.zs.size,) + x.shape, dtype=np.float32)
    for k, z in enumerate(grid.zs):
        s = tmpl.copy()
        # Lungs between the apex and the diaphragm; liver / spleen below.
        apex = np.clip((LUNG_APEX_Z - z) / 40.0, 0.0, 1.0)
        t = (k * 0.37) % len(tiles)
        i0 = int(t)
        f = t - i0
        tex = (1 - f) * tiles[i0] + f * tiles[(i0 + 1) % len(tiles)]
        lung_hu = LUNG + 45.0 * tex + 600.0 * np.clip(tex - 2.2, 0.0, 1.0)
        for mask, dome, below in (
            (lung_r, patient.z_diaphragm, LIVER),
            (lung_l, patient.z_diaphragm - 15, 40.0),
        ):
            if z > dome:
                _paint(s, mask * apex, lung_hu)
            else:
                _paint(s, mask, below)
        # Spine: vertebral body (cancellous + cortical rim) or an intervertebral disc.
        in_disc = (z % VERTEBRA_PITCH_MM) < DISC_MM
        if in_disc:
            _paint(s, vb_out, 80.0)
        else:
            _paint(s, vb_out, cort)
            _paint(s, vb_in, canc + bone_texture)
        _paint(s, posterior_bone, 0.5 * (canc + cort))
        _paint(s, canal, CSF)
        _paint(s, esophagus, 40.0)
        if -85.0 < z < 55.0:
            _paint(s, _ramp(sternum_d, w), cort * 0.7)
            _paint(s, _ramp(sternum_d + 1.5, w), canc + 40.0 + bone_texture)
        if z > 35.0:
            _paint(s, trachea_wall, MUSCLE)
            _paint(s, trachea, AIR)
        elif z > 15.0:
            for sx in (-1.0, 1.0):
                cx = sx * (8.0 + (35.0 - z) * 1.2)
                _paint(s, _ramp(_ellipse_distance(x, y, cx, 18.0, 8.0, 8.0), w), MUSCLE)
                _paint(s, _ramp(_ellipse_distance(x, y, cx, 18.0, 6.0, 6.0), w), AIR)
        _paint_ribs(s, ring_idx, ring_alpha, ring_depth, z, canc, cort, w)
        vol[k] = s

    if lung_vessels:
        d_lung = tube_distance(grid, list(lung_vessels), reach_mm=w)
        _paint(vol, _ramp(d_lung, w) * (vol < LUNG_VESSEL_BELOW_HU), BLOOD)
    _paint_heart(vol, grid, patient)
    if patient.chambers:
        _paint_chambers(vol, grid, patient)
    d_aorta = tube_distance(grid, [aorta], reach_mm=2.0 * w)
    _paint(vol, _ramp(d_aorta, w), BLOOD)
    if patient.chambers:
        _paint(vol, _ramp(tube_distance(grid, [anatomy_v3.pulmonary_trunk(patient)], 2.0 * w), w), BLOOD)
        groove = tube_distance(grid, [anatomy_v3.posterior_groove(patient)], patient.groove_fat_mm + w)
        _paint(vol, _ramp(groove - patient.groove_fat_mm, w), FAT)
    d_cor = tube_distance(grid, coronaries, reach_mm=max(4.0, patient.groove_fat_mm + 1.0))
    _paint(vol, _ramp(d_cor - patient.groove_fat_mm, w), FAT)
    _paint(vol, _ramp(d_cor, w), BLOOD)
    return vol


def _paint_ribs(s, ring_idx, ring_alpha, ring_depth, z, canc, cort, w) -> None:
    """Ribs run obliquely: rib k crosses height ``top - k * pitch - drop * (1 - cos(alpha)) / 2``."""
    z_at = RIB_TOP_Z - RIB_DROP_MM * (1.0 - np.cos(ring_alpha)) / 2.0
    u = (z_at - z) / RIB_PITCH_MM
    k = np.round(u)
    dz = (u - k) * RIB_PITCH_MM
    valid = (k >= 0) & (k < NUM_RIBS)
    r = np.sqrt(((ring_depth - 21.0) / 3.5) ** 2 + (dz / 6.0) ** 2)
    inside = np.clip((1.0 - r) * 3.5 / w + 0.5, 0.0, 1.0) * valid
    cartilage = np.abs(ring_alpha) > np.pi - 0.5
    marrow = r < 0.65
    value = np.where(cartilage, CARTILAGE, np.where(marrow, canc + 40.0, cort * 0.8)).astype(np.float32)
    cur = s[ring_idx]
    s[ring_idx] = cur + inside * (value - cur)


def _paint_heart(vol: np.ndarray, grid: AxialGrid, patient: Patient) -> None:
    """Pericardial fat shell (``patient.pericardial_fat_mm``; 4 mm before v3) and the heart (blood and
    myocardium, +42 HU) as one ellipsoid."""
    frame = np.stack([patient.heart_u, patient.heart_v, patient.heart_w])  # rows: u, v, w
    fat = patient.pericardial_fat_mm
    layers = ((np.asarray(patient.heart_axes) + fat, FAT), (np.asarray(patient.heart_axes) + 0.0, BLOOD))
    _paint_ellipsoid(
        vol, grid, patient.heart_centre, frame, layers, reach=max(patient.heart_axes) + fat + 2.0
    )


def _paint_chambers(vol: np.ndarray, grid: AxialGrid, patient: Patient) -> None:
    """v3: the ventricular cavity (``cavity_contrast_hu`` under the myocardium), then the atria (blood,
    merged with the heart; the AV groove's fat, painted with the coronaries, marks where they meet)."""
    cavity = anatomy_v3.ventricular_cavity(patient)
    layers = ((cavity.semi_mm, BLOOD - patient.cavity_contrast_hu),)
    _paint_ellipsoid(vol, grid, cavity.centre, cavity.axes, layers, reach=cavity.semi_mm.max() + 2.0)
    for atrium in anatomy_v3.chambers(patient):
        _paint_ellipsoid(
            vol, grid, atrium.centre, atrium.axes, ((atrium.semi_mm, BLOOD),), atrium.semi_mm.max() + 2.0
        )


def _paint_ellipsoid(vol, grid: AxialGrid, centre, frame, layers, reach: float) -> None:
    """Paints nested ellipsoids (``layers``: (semi-axes mm along ``frame``'s rows, HU), outermost first)
    with one-pixel partial-volume edges, inside the box ``centre +- reach`` (mm)."""
    c = np.asarray(centre)
    box = grid.box(c - reach, c + reach)
    if box is None:
        return
    bz, by, bx = box
    pz = grid.zs[bz, None, None] - c[2]
    py = grid.ys[None, by, None] - c[1]
    px = grid.xs[None, None, bx] - c[0]
    sub = vol[box]
    for axes, value in layers:
        q = sum(((frame[i, 0] * px + frame[i, 1] * py + frame[i, 2] * pz) / axes[i]) ** 2 for i in range(3))
        d = (np.sqrt(q) - 1.0) * axes.min()
        _paint(sub, _ramp(d, grid.pixel_mm).astype(np.float32), value)
    vol[box] = sub
