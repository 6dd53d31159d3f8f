"""CT volumes in NIfTI (``*.nii`` / ``*.nii.gz``, as nnU-Net and TotalSegmentator users hold them): HU from
the voxel values (nibabel applies ``scl_slope`` / ``scl_inter``), geometry from the header.

A volume is turned to the axis order of the DICOM route (``calcjax.io.geometry``: voxel axes along patient
left, posterior and superior, the orientation nearest its own), so a scan scores the same from its DICOM
series and from a NIfTI of it. What a NIfTI cannot say is read as follows, and none of it changes a score:
no kVp (the 130 HU threshold, as for a DICOM series without KVP), the protocol from the field of view
(``calcjax.core.hu``), slice thickness = the slice spacing.

Refused, each with the file, the header field and the rule (:class:`NiftiError`): not 3D; no orientation
(``qform_code`` and ``sform_code`` both 0); a singular or non-finite affine; a voxel size (``pixdim``)
that is not finite and positive; spatial units other than mm, m or um (unknown units read as mm, what
the format's writers mean by them); a non-finite value; values that are not HU (nothing below
``MAX_MIN_HU``: a CT in HU holds air near -1000 HU; stored values without their rescale do not).
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np

from calcjax.core.hu import CARDIAC_FOV_MAX_MM, CHEST_FOV_MIN_MM
from calcjax.io.errors import InputError
from calcjax.io.geometry import LPS_TO_RAS, Grid

MAX_MIN_HU = -200.0  # a CT volume in HU has its minimum (air, lung, padding) below this
UNIT_MM = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}
DICOM_AXES = ("L", "P", "S")  # nibabel's codes of the DICOM route's (x, y, z) voxel axes


class NiftiError(InputError):
    """A NIfTI file that cannot be scored, naming the file, the header field and the rule."""

    kind = "bad_nifti"


@dataclasses.dataclass(frozen=True)
class NiftiVolume:
    """``hu`` float32 ``(Z, Y, X)`` on ``grid`` (``calcjax.io.geometry``), and ``meta`` as the DICOM
    route's (protocol, kvp None, slice thickness and increment)."""

    hu: np.ndarray
    grid: Grid
    meta: dict


def _load(path: str) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for damaged files
        raise NiftiError(path, f"unreadable NIfTI ({e.__class__.__name__}: {str(e)[:150]})") from None
    if img.ndim == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if img.ndim != 3:
        raise NiftiError(path, f"dim: a CT volume has 3 dimensions, this one has shape {img.shape}")
    return img


def _checked_affine(path: str, img) -> np.ndarray:
    """The image's RAS affine in mm, refused when the header gives no usable orientation or voxel size."""
    header = img.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise NiftiError(path, "qform_code and sform_code are both 0: the volume's orientation is undefined")
    zooms = np.asarray(header.get_zooms()[:3], np.float64)
    if not (np.all(np.isfinite(zooms)) and np.all(zooms > 0)):
        raise NiftiError(path, f"pixdim: voxel sizes must be finite and > 0, got {zooms.tolist()}")
    unit = header.get_xyzt_units()[0]
    if unit not in UNIT_MM:
        raise NiftiError(path, f"xyzt_units: spatial unit {unit!r} is not a length (mm, meter, micron)")
    affine = np.asarray(img.affine, np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise NiftiError(path, "sform/qform: the affine is singular or not finite")
    scaled = affine.copy()
    scaled[:3, :] *= UNIT_MM[unit]
    return scaled


def _to_dicom_axes(img, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data ``(x, y, z)`` reordered to :data:`DICOM_AXES`, its RAS affine)."""
    orientations = nib.orientations
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(DICOM_AXES)
    )
    data = orientations.apply_orientation(img.get_fdata(dtype=np.float32), transform)
    return data, affine @ orientations.inv_ornt_aff(transform, img.shape)


def _grid(affine_ras: np.ndarray, shape_xyz: tuple[int, int, int]) -> Grid:
    lps = LPS_TO_RAS @ affine_ras  # the flip is its own inverse
    cols = [lps[:3, i] for i in range(3)]
    dx, dy, dz = (float(np.linalg.norm(c)) for c in cols)
    return Grid(
        shape=(int(shape_xyz[2]), int(shape_xyz[1]), int(shape_xyz[0])),
        spacing=(dz, dy, dx),
        origin=tuple(float(v) for v in lps[:3, 3]),
        row_dir=tuple(float(v) for v in cols[0] / dx),
        col_dir=tuple(float(v) for v in cols[1] / dy),
    )


def _protocol(fov_mm: float) -> str:
    """``cardiac`` / ``chest`` / ``unknown`` from the in-plane field of view in mm (no gating tags here)."""
    if fov_mm <= CARDIAC_FOV_MAX_MM:
        return "cardiac"
    return "chest" if fov_mm >= CHEST_FOV_MIN_MM else "unknown"


def read_ct_nifti(path: str) -> NiftiVolume:
    """The CT volume of a NIfTI file in HU (module docstring); :class:`NiftiError` names what is wrong."""
    img = _load(path)
    affine = _checked_affine(path, img)
    data, affine = _to_dicom_axes(img, affine)
    hu = data  # float32, scl_slope / scl_inter applied by nibabel
    if not np.all(np.isfinite(hu)):
        raise NiftiError(path, f"{int((~np.isfinite(hu)).sum())} voxel values are NaN or infinite")
    if float(hu.min()) > MAX_MIN_HU:
        raise NiftiError(
            path,
            f"voxel values are not HU: the minimum is {float(hu.min()):.0f}, a CT in HU holds air near "
            "-1000 (stored values without their rescale slope and intercept?)",
        )
    grid = _grid(affine, data.shape)
    fov_mm = grid.shape[2] * grid.spacing[2]
    meta = {
        "protocol": _protocol(fov_mm),
        "kvp": None,
        "slice_thickness_mm": grid.spacing[0],
        "slice_increment_mm": grid.spacing[0],
    }
    return NiftiVolume(np.ascontiguousarray(hu.transpose(2, 1, 0)), grid, meta)


def write_ct_nifti(path: str, hu: np.ndarray, grid: Grid) -> None:
    """Writes HU ``(Z, Y, X)`` as int16 NIfTI-1 ``(x, y, z)`` with the grid's RAS affine (qform and sform,
    mm): what :func:`read_ct_nifti` reads back to the same volume and grid."""
    affine = grid.affine_ras()
    data = np.clip(np.rint(np.asarray(hu).transpose(2, 1, 0)), -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
