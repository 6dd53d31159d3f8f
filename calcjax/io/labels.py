"""Calcium labels that users bring: NIfTI masks and COCA-style OsiriX plist ROIs, checked against the image.

Both readers return uint8 ``(z, y, x)`` labels on the image grid (0 background, 1 LM, 2 LAD, 3 LCX, 4 RCA).

- NIfTI: never resampled, always checked. A mask whose voxels are a permutation / flip of the image grid's
  (another tool's axis order) is reoriented losslessly; any other grid (shape, spacing, affine) is refused
  with both grids in the message.
- COCA plist XML (Stanford AIMI COCA release, as its files are): ``Images`` -> ``ImageIndex``, ``ROIs`` ->
  ``Name``, ``Point_px`` ``"(x, y)"``, ``Point_mm`` ``"(x, y, z)"``, ``Area`` (cm^2). Polygons are rasterised
  with pixel centres at integer Point_px coordinates (even-odd rule); the slice is found from Point_mm
  projected on the slice normal (``ImageIndex``, which counts ascending z, only when Point_mm is missing);
  several ROIs on one slice are all kept; ROIs with zero points are skipped; voxels below ``threshold_hu``
  inside an ROI are dropped. Each ROI's rasterised area is checked against its own ``Area`` field.
"""

from __future__ import annotations

import os
import plistlib
import re

import nibabel as nib
import numpy as np
from absl import logging

from calcjax.core.agatston import CALCIUM_THRESHOLD_HU
from calcjax.io.errors import InputError
from calcjax.io.geometry import Grid

COCA_NAMES = {
    "left coronary artery": 1,  # COCA calls the left main "Left Coronary Artery"
    "left main": 1,
    "left anterior descending artery": 2,
    "left circumflex artery": 3,
    "right coronary artery": 4,
}
MAX_LABEL = 4
AREA_TOLERANCE = 0.2  # relative difference of rasterised vs recorded ROI area that triggers a warning


class LabelError(InputError):
    """A label file that does not fit its image, with the file and the reason."""

    kind = "label"


class LabelGridError(LabelError):
    kind = "label_grid_mismatch"


class LabelOutsideError(LabelError):
    """A label ROI that lies outside the image: it cannot be placed, so the scan has no usable reference
    (an error for the scan, never a silent zero)."""

    kind = "label_outside_image"


OUTSIDE_TOLERANCE_PX = 1.0  # ROI points may lie this far beyond the image's edge pixel centres


def _describe(shape, affine) -> str:
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    return (
        f"shape {tuple(int(s) for s in shape)}, spacing {tuple(round(float(z), 4) for z in zooms)} mm, "
        f"origin {tuple(round(float(o), 3) for o in affine[:3, 3])} mm"
    )


def write_label_nifti(path: str, label: np.ndarray, grid: Grid) -> None:
    """Writes labels ``(z, y, x)`` as NIfTI-1 ``(x, y, z)`` uint8 with the grid's RAS affine (qform and
    sform), under a temporary name renamed into place: what :func:`read_nifti_label` reads back."""
    affine = grid.affine_ras()
    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(label).transpose(2, 1, 0)).astype(np.uint8), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path + ".tmp.nii.gz"
    nib.save(img, tmp)
    os.replace(tmp, path)


def read_nifti_label(path: str, grid: Grid) -> np.ndarray:
    """Reads a NIfTI calcium mask on ``grid`` (see module docstring); returns uint8 ``(z, y, x)``."""
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise LabelError(path, f"unreadable NIfTI ({e.__class__.__name__}: {str(e)[:150]})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    target_shape = grid.shape[::-1]  # (x, y, z)
    target = grid.affine_ras()
    mismatch = LabelGridError(
        path,
        f"mask grid ({_describe(data.shape, img.affine)}) does not match the image grid "
        f"({_describe(target_shape, target)}); masks are never resampled",
    )
    if data.ndim != 3:
        raise mismatch
    m = np.linalg.inv(target) @ img.affine  # mask voxel index -> image voxel index
    perm = np.round(m[:3, :3])
    if np.abs(m[:3, :3] - perm).max() > 1e-3 or not np.array_equal(np.abs(perm).sum(axis=0), np.ones(3)):
        raise mismatch
    if not np.array_equal(np.abs(perm).sum(axis=1), np.ones(3)):
        raise mismatch
    out = data
    axes = [int(np.flatnonzero(perm[i])[0]) for i in range(3)]  # image axis i <- mask axis axes[i]
    out = np.transpose(out, axes)
    for i in range(3):
        if perm[i, axes[i]] < 0:
            out = np.flip(out, axis=i)
    expected_t = np.array([0.0 if perm[i, axes[i]] > 0 else out.shape[i] - 1.0 for i in range(3)])
    if out.shape != target_shape or np.abs(m[:3, 3] - expected_t).max() > 0.05:
        raise mismatch
    if not np.issubdtype(out.dtype, np.integer):
        if not np.all(np.mod(out, 1) == 0):
            raise LabelError(path, "mask values are not integers")
    if out.size and (out.min() < 0 or out.max() > MAX_LABEL):
        raise LabelError(path, f"mask values {out.min()}..{out.max()} outside 0..{MAX_LABEL}")
    return np.ascontiguousarray(out.transpose(2, 1, 0)).astype(np.uint8)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _parse_points(points, dims: int) -> np.ndarray:
    out = []
    for p in points:
        values = [float(v) for v in _NUMBER.findall(str(p))]
        if len(values) != dims:
            raise ValueError(f"point {p!r} does not hold {dims} numbers")
        out.append(values)
    return np.asarray(out, dtype=np.float64).reshape(-1, dims)


def rasterise_polygon(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``(rows, cols)`` mask of pixel centres (integer x = column, y = row) inside the polygon.

    Even-odd rule by crossings. A centre exactly on an edge follows the top-left rule: inside on edges
    facing smaller x or smaller y, outside on edges facing larger x or larger y (an axis-aligned rectangle
    ``[x0, x1] x [y0, y1]`` holds the centres of ``[x0, x1) x [y0, y1)``), so two polygons sharing an edge
    never both claim a centre on it. Off the edges, it equals ``matplotlib.path.Path.contains_points``
    (a randomized test holds the two equal)."""
    mask = np.zeros(shape, dtype=bool)
    if len(points_xy) < 3:
        return mask
    x0 = max(int(np.floor(points_xy[:, 0].min())), 0)
    x1 = min(int(np.ceil(points_xy[:, 0].max())), shape[1] - 1)
    y0 = max(int(np.floor(points_xy[:, 1].min())), 0)
    y1 = min(int(np.ceil(points_xy[:, 1].max())), shape[0] - 1)
    if x1 < x0 or y1 < y0:
        return mask
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    inside = np.zeros(yy.shape, dtype=bool)
    xs, ys = points_xy[:, 0], points_xy[:, 1]
    for xi, yi, xj, yj in zip(xs, ys, np.roll(xs, 1), np.roll(ys, 1), strict=True):
        if yi == yj:
            continue
        crosses = (yi > yy) != (yj > yy)
        x_cross = (xj - xi) * (yy - yi) / (yj - yi) + xi
        inside ^= crosses & (xx < x_cross)
    mask[y0 : y1 + 1, x0 : x1 + 1] = inside
    return mask


def read_coca_xml(
    path: str, grid: Grid, hu: np.ndarray, *, threshold_hu: float = CALCIUM_THRESHOLD_HU
) -> np.ndarray:
    """Reads COCA-style plist ROIs onto ``grid`` (see module docstring); returns uint8 ``(z, y, x)``."""
    try:
        with open(path, "rb") as f:
            plist = plistlib.load(f)
        images = plist["Images"]
    except Exception as e:
        raise LabelError(path, f"not a COCA plist ({e.__class__.__name__}: {str(e)[:150]})") from None
    nz, ny, nx = grid.shape
    dz, dy, dx = grid.spacing
    normal = grid.normal
    s0 = float(np.dot(normal, grid.origin))
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for image in images:
        for roi in image.get("ROIs", []):
            points = roi.get("Point_px") or []
            if len(points) == 0 or int(roi.get("NumberOfPoints", len(points))) == 0:
                continue  # COCA holds ROIs with zero points
            name = str(roi.get("Name", "")).strip()
            value = COCA_NAMES.get(name.lower())
            if value is None:
                raise LabelError(path, f"ROI name {name!r} is not one of {sorted(set(COCA_NAMES))}")
            try:
                px = _parse_points(points, 2)
                mm = _parse_points(roi.get("Point_mm") or [], 3)
            except ValueError as e:
                raise LabelError(path, str(e)) from None
            if len(mm):
                s = float(np.median(mm @ normal))
                k_float = (s - s0) / dz
                k = int(round(k_float))
                if abs(k_float - k) > 0.25:
                    raise LabelError(
                        path, f"ROI {name!r} lies {k_float:.2f} slices from the grid: no slice at its z"
                    )
            else:
                k = int(image["ImageIndex"])
            if not 0 <= k < nz:
                raise LabelError(path, f"ROI {name!r} on slice {k}, outside the {nz} slices of the image")
            lo, hi = -0.5 - OUTSIDE_TOLERANCE_PX, np.array([nx, ny]) - 0.5 + OUTSIDE_TOLERANCE_PX
            if len(px) and ((px < lo) | (px > hi)).any():
                raise LabelOutsideError(
                    path,
                    f"ROI {name!r} on slice {k} reaches pixel ({px[:, 0].max():.0f}, {px[:, 1].max():.0f}) "
                    f"or ({px[:, 0].min():.0f}, {px[:, 1].min():.0f}), outside the {nx}x{ny} image",
                )
            inside = rasterise_polygon(px, (ny, nx))
            area_cm2 = roi.get("Area")
            if area_cm2 is not None:
                got = inside.sum() * dy * dx / 100.0
                if abs(got - float(area_cm2)) > max(AREA_TOLERANCE * float(area_cm2), 2 * dy * dx / 100.0):
                    logging.warning(  # no path: it may name the patient (calcjax.io.deid)
                        "label ROI %r on slice %d rasterises to %.4f cm^2, its Area says %.4f",
                        name,
                        k,
                        got,
                        area_cm2,
                    )
            labels[k][inside & (hu[k] >= threshold_hu)] = value
    return labels
