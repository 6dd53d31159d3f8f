"""Reading one CT series as PACS exports deliver it: ``read_series(files) -> Volume``.

HU ``(z, y, x)`` with z ascending along the slice normal, spacing ``(dz, dy, dx)`` mm with dz from the real
position differences, LPS origin and direction cosines, and non-identifying metadata (kVp, slice
thickness, protocol guess, manufacturer, kernel). Finding the series in a folder tree is
``calcjax.io.dicom_series``; headers, pixels and the refusals have modules of their own
(``dicom_headers``, ``dicom_pixels``, ``dicom_errors``), whose errors this module's callers also meet here.

Rules (DICOM PS3.3 image plane and CT modules, and the pitfalls of real exports): sort by ImagePositionPatient
projected on the slice normal, never by file name or InstanceNumber; drop localizer / scout images (ImageType
LOCALIZER, or an orientation other than the series'); apply RescaleSlope / Intercept per slice; map
PixelPaddingValue (and PixelPaddingRangeLimit) to air *before* rescaling; refuse duplicates with different
pixels, gaps, non-uniform spacing and gantry tilt with a reason; read Enhanced (multi-frame) CT from its
functional groups; decode compressed transfer syntaxes when the ``codecs`` extra is installed and name the
extra otherwise.

No identifying value (names, IDs, dates, UIDs) is ever put in an error message or in ``Volume.meta``.
No jax here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
from pydicom.uid import UID

from calcjax.core.hu import CARDIAC_FOV_MAX_MM, CHEST_FOV_MIN_MM
from calcjax.io.dicom_errors import (  # noqa: F401 - the reader's refusals, as its callers name them
    DicomError,
    GeometryError,
    InconsistentSeriesError,
    MissingCodecError,
    MixedThicknessError,
    NoPixelDataError,
    NotCTError,
    NotDicomError,
    RescaleError,
    SingleSliceError,
    TruncatedError,
)
from calcjax.io.dicom_headers import ReaderWarnings, read_dataset
from calcjax.io.dicom_pixels import Frame, padding_range, rescale_into, rescale_of, stored_pixels
from calcjax.io.dicom_series import find_series
from calcjax.io.geometry import Grid

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}


SPACING_TOLERANCE = 0.01  # relative deviation of a gap from the median gap still called uniform


ORIENTATION_TOLERANCE = 1e-3  # max abs difference of direction cosines within one series


GATING_TAGS = (
    "TriggerTime",
    "CardiacSynchronizationTechnique",
    "NominalCardiacTriggerDelayTime",
    "HeartRate",
)


THICKNESS_TOLERANCE_MM = 0.01


@dataclasses.dataclass
class Volume:
    """A CT volume.

    Attributes:
      hu: ``(z, y, x)`` HU, int16 when every slice's rescale is integral (slope 1), else float32.
      grid: geometry (spacing ``(dz, dy, dx)`` mm, LPS origin of voxel (0, 0, 0), direction cosines).
      meta: non-identifying metadata: kvp, slice_thickness_mm, protocol (chest / cardiac / unknown),
        gated, fov_mm, manufacturer, model, kernel, num_slices, dropped_localizers, enhanced,
        reader_warnings (pydicom's warnings while reading, ``{value-free message: count}``).
      source: the files read, in z order (for error messages and label lookup only).
    """

    hu: np.ndarray
    grid: Grid
    meta: dict
    source: list[str]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.grid.spacing


def _get(ds, keyword: str, path: str, error=GeometryError):
    """``ds.get(keyword)``; pydicom converts a DS / IS value on access and raises on text like "abc": that
    becomes ``error`` naming the file and the attribute."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError) as e:
        raise error(path, f"{keyword} is not a valid number ({str(e).splitlines()[0][:80]})") from None


def _number_or_none(ds, keyword: str) -> float | None:
    """A metadata number (kVp, field of view), or None when absent or unusable (never a crash)."""
    try:
        value = ds.get(keyword)
        x = float(value) if value not in (None, "") else None
    except (ValueError, TypeError, OverflowError):
        return None
    return x if x is not None and np.isfinite(x) and x > 0 else None


def _float_list(value, n: int, path: str, tag: str) -> np.ndarray:
    """``n`` finite numbers of a multi-valued attribute; GeometryError naming the attribute otherwise."""
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(path, f"{tag} is missing or not numeric") from None
    if out.size != n:
        raise GeometryError(path, f"{tag} has {out.size} values, expected {n}")
    if not np.all(np.isfinite(out)):
        raise GeometryError(path, f"{tag} holds a value that is not finite ({_values(out)})")
    return out


MAX_PIXEL_SPACING_MM = 20.0  # CT pixels are 0.2-2 mm; beyond this a header is damaged, not a scan


def _pixel_spacing(value, path: str) -> np.ndarray:
    """PixelSpacing (row, column) in mm: two finite numbers in (0, MAX_PIXEL_SPACING_MM] (areas and
    Agatston scale with it: a damaged 1e6 would score every lesion in the millions)."""
    out = _float_list(value, 2, path, "PixelSpacing")
    if not np.all((out > 0) & (out <= MAX_PIXEL_SPACING_MM)):
        raise GeometryError(
            path, f"PixelSpacing must be > 0 and <= {MAX_PIXEL_SPACING_MM:g} mm, got {_values(out)}"
        )
    return out


def _orientation(value, path: str) -> np.ndarray:
    """ImageOrientationPatient: a row and a column direction, each of unit length and orthogonal to the
    other (to 1e-2), else the slice normal and so the slice order are undefined."""
    out = _float_list(value, 6, path, "ImageOrientationPatient")
    row, col = out[:3], out[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise GeometryError(
            path, f"ImageOrientationPatient must be two orthogonal unit vectors, got {_values(out)}"
        )
    return out


def _thickness(ds) -> float | None:
    """SliceThickness in mm, or None when absent, not a number or not > 0: it is reported metadata only
    (the slice positions give the spacing every score uses), so an unusable value cannot change a score."""
    return _number_or_none(ds, "SliceThickness")


def _values(a: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in a)


def _check_ct(ds: pydicom.Dataset, path: str) -> None:
    modality = str(ds.get("Modality", ""))
    sop = str(ds.get("SOPClassUID", ""))
    if modality != "CT":
        raise NotCTError(path, f"Modality is {modality or 'missing'}, not CT")
    if sop and sop not in CT_SOP_CLASSES:
        raise NotCTError(path, f"SOP class {UID(sop).name} is not a CT image")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NoPixelDataError(path, "no pixel data")
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "").strip().upper()
    if samples not in (1, "1") or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotCTError(
            path, f"SamplesPerPixel {samples} / PhotometricInterpretation {photometric or 'empty'}: a CT "
            "image holds one grey value per pixel (MONOCHROME1 or MONOCHROME2), so no HU can be read from it",
        )  # fmt: skip


def _is_localizer(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type


def _classic_frames(ds: pydicom.Dataset, path: str) -> list[Frame]:
    slope, intercept = rescale_of(
        _get(ds, "RescaleSlope", path, RescaleError), _get(ds, "RescaleIntercept", path, RescaleError), path
    )
    return [
        Frame(
            path=path,
            position=_float_list(_get(ds, "ImagePositionPatient", path), 3, path, "ImagePositionPatient"),
            orientation=_orientation(_get(ds, "ImageOrientationPatient", path), path),
            pixel_spacing=_pixel_spacing(_get(ds, "PixelSpacing", path), path),
            thickness=_thickness(ds),
            slope=slope,
            intercept=intercept,
            pixels=stored_pixels(ds, path),
            padding=padding_range(ds),
        )
    ]


def _enhanced_frames(ds: pydicom.Dataset, path: str) -> list[Frame]:
    """Frames of an Enhanced CT file from its shared and per-frame functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = int(ds.get("NumberOfFrames", 1))
    if len(per_frame) != n:
        raise GeometryError(path, f"{len(per_frame)} per-frame functional groups for {n} frames")

    def group(fg, name):
        for source in (fg, shared):
            if source is not None and name in source:
                return source[name][0]
        return None

    pixels = stored_pixels(ds, path)
    pixels = pixels.reshape((n,) + pixels.shape[-2:])
    frames = []
    for i, fg in enumerate(per_frame):
        pos, ori, meas = (
            group(fg, "PlanePositionSequence"),
            group(fg, "PlaneOrientationSequence"),
            group(fg, "PixelMeasuresSequence"),
        )
        trans = group(fg, "PixelValueTransformationSequence")
        slope, intercept = rescale_of(
            None if trans is None else _get(trans, "RescaleSlope", path, RescaleError),
            None if trans is None else _get(trans, "RescaleIntercept", path, RescaleError),
            path,
        )
        if pos is None or ori is None or meas is None:
            raise GeometryError(path, f"frame {i + 1}: plane position, orientation or pixel measures missing")
        frames.append(
            Frame(
                path=path,
                position=_float_list(
                    _get(pos, "ImagePositionPatient", path), 3, path, "ImagePositionPatient"
                ),
                orientation=_orientation(_get(ori, "ImageOrientationPatient", path), path),
                pixel_spacing=_pixel_spacing(_get(meas, "PixelSpacing", path), path),
                thickness=_thickness(meas),
                slope=slope,
                intercept=intercept,
                pixels=pixels[i],
                padding=padding_range(ds),
            )
        )
    return frames


def read_series(files: str | list[str] | tuple[str, ...], *, protocol: str | None = None) -> Volume:
    """Reads one CT series (a folder holding one series, or its files) as a :class:`Volume`.

    Args:
      files: a folder (every file in it must belong to one series) or a list of files.
      protocol: override of the protocol guess (``chest`` / ``cardiac`` / ``unknown``).

    Raises:
      DicomError (one of its subclasses) naming the file and the reason.
    """
    if isinstance(files, str):
        folder = files
        found, bad = find_series(folder)
        if bad:
            raise bad[0]
        if len(found) != 1:
            raise InconsistentSeriesError(
                folder, f"{len(found)} series in this folder; pass one series' files"
            )
        files = found[0].files
    files = list(files)
    if not files:
        raise SingleSliceError("<empty>", "no files")
    frames: list[Frame] = []
    first = None
    localizers = 0
    counter = ReaderWarnings()
    for path in files:
        with counter.capture():
            ds = read_dataset(path, headers_only=False)
            _check_ct(ds, path)
            if _is_localizer(ds):
                localizers += 1
                continue
            if first is None:
                first = ds
            enhanced = "PerFrameFunctionalGroupsSequence" in ds
            frames.extend(_enhanced_frames(ds, path) if enhanced else _classic_frames(ds, path))
    if first is None:
        raise SingleSliceError(files[0], f"only localizer images ({localizers}) in this series")
    frames, dropped = _drop_other_orientations(frames)
    localizers += dropped
    if len(frames) < 2:
        raise SingleSliceError(frames[0].path, "one slice only; a volume needs at least two")
    with counter.capture():
        vol = _assemble(frames, first, localizers, protocol)
    vol.meta["reader_warnings"] = dict(counter.items())
    return vol


def _drop_other_orientations(frames: list[Frame]) -> tuple[list[Frame], int]:
    """Keeps the frames with the series' majority orientation (scouts in a series differ)."""
    keys = [tuple(np.round(f.orientation, 3)) for f in frames]
    values, counts = np.unique(np.asarray(keys), axis=0, return_counts=True)
    major = values[np.argmax(counts)]
    kept = [f for f in frames if np.abs(f.orientation - major).max() <= 0.01]
    return kept, len(frames) - len(kept)


def _assemble(frames: list[Frame], first: pydicom.Dataset, localizers: int, protocol: str | None) -> Volume:
    ref = frames[0]
    for f in frames[1:]:
        if np.abs(f.orientation - ref.orientation).max() > ORIENTATION_TOLERANCE:
            raise InconsistentSeriesError(f.path, "orientation differs from the rest of the series")
        if f.pixels.shape != ref.pixels.shape:
            raise InconsistentSeriesError(
                f.path, f"matrix {f.pixels.shape} differs from {ref.pixels.shape} in the same series"
            )
        if np.abs(f.pixel_spacing - ref.pixel_spacing).max() > 1e-4:
            raise InconsistentSeriesError(f.path, "PixelSpacing differs inside the series")
    row_dir, col_dir = ref.orientation[:3], ref.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    along = np.array([f.position @ normal for f in frames])
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]

    # Duplicates: the same position twice. Identical pixels are dropped, different pixels refused.
    keep = [0]
    for i in range(1, len(frames)):
        if abs(along[i] - along[keep[-1]]) < 1e-3:
            if not np.array_equal(frames[i].pixels, frames[keep[-1]].pixels):
                raise GeometryError(
                    frames[i].path, f"two different slices at the same position {along[i]:.3f} mm"
                )
            continue
        keep.append(i)
    frames, along = [frames[i] for i in keep], along[keep]
    if len(frames) < 2:
        raise SingleSliceError(frames[0].path, "one distinct slice position only")

    gaps = np.diff(along)
    dz = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - dz)))
    if abs(gaps[worst] - dz) > SPACING_TOLERANCE * dz:
        kind = "a gap (missing slices)" if gaps[worst] > 1.5 * dz else "non-uniform slice spacing"
        raise GeometryError(
            frames[worst + 1].path,
            f"{kind}: {gaps[worst]:.3f} mm between slices {worst} and {worst + 1}, median {dz:.3f} mm",
        )
    thick = [(f.thickness, f.path) for f in frames if f.thickness is not None]
    if thick:
        lo, hi = min(thick), max(thick)
        if hi[0] - lo[0] > THICKNESS_TOLERANCE_MM:
            raise MixedThicknessError(
                hi[1], f"slice thickness {hi[0]:g} mm here, {lo[0]:g} mm elsewhere in the series"
            )
    # Gantry tilt: slice positions must move along the normal, not sideways.
    shift = frames[-1].position - frames[0].position
    sideways = np.linalg.norm(shift - (shift @ normal) * normal) / max(abs(shift @ normal), 1e-6)
    tilt = float(first.get("GantryDetectorTilt", 0) or 0)
    if sideways > 1e-3 or abs(tilt) > 0.01:
        angle = np.degrees(np.arctan(sideways)) if sideways > 1e-3 else tilt
        raise GeometryError(
            frames[0].path, f"gantry tilt of {angle:.2f} degrees; correct the tilt before reading"
        )

    integral = all(f.slope == 1.0 and float(f.intercept).is_integer() for f in frames)
    dtype = np.int16 if integral else np.float32
    hu = np.empty((len(frames),) + ref.pixels.shape, dtype=dtype)
    for k, f in enumerate(frames):
        rescale_into(hu[k], f, integral)
    dy, dx = (float(s) for s in ref.pixel_spacing)
    grid = Grid(
        shape=hu.shape,
        spacing=(abs(dz), dy, dx),
        origin=tuple(float(v) for v in frames[0].position),
        row_dir=tuple(float(v) for v in row_dir),
        col_dir=tuple(float(v) for v in col_dir),
    )
    meta = _metadata(first, frames, grid, localizers, protocol)
    return Volume(hu=hu, grid=grid, meta=meta, source=[f.path for f in frames])


def _metadata(ds, frames, grid: Grid, localizers: int, protocol: str | None) -> dict:
    fov = _number_or_none(ds, "ReconstructionDiameter")  # unusable: the image's own width decides
    fov_mm = fov if fov is not None else float(grid.shape[2] * grid.spacing[2])
    gated = any(ds.get(t) not in (None, "") for t in GATING_TAGS) or _enhanced_gated(ds)
    if protocol is None:
        if gated or fov_mm <= CARDIAC_FOV_MAX_MM:
            protocol = "cardiac"
        elif fov_mm >= CHEST_FOV_MIN_MM:
            protocol = "chest"
        else:
            protocol = "unknown"
    thickness = frames[0].thickness
    kvp = _number_or_none(ds, "KVP")
    return {
        "kvp": kvp,
        "slice_thickness_mm": thickness,
        "slice_increment_mm": grid.spacing[0],
        "pixel_spacing_mm": [grid.spacing[1], grid.spacing[2]],
        "fov_mm": fov_mm,
        "gated": bool(gated),
        "protocol": protocol,
        "manufacturer": str(ds.get("Manufacturer", "")),
        "model": str(ds.get("ManufacturerModelName", "")),
        "kernel": _kernel(ds),
        "num_slices": grid.shape[0],
        "matrix": [grid.shape[1], grid.shape[2]],
        "dropped_localizers": localizers,
        "enhanced": "PerFrameFunctionalGroupsSequence" in ds,
    }


def _enhanced_gated(ds) -> bool:
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    return shared is not None and "CardiacSynchronizationSequence" in shared


def _kernel(ds) -> str:
    k = ds.get("ConvolutionKernel", "")
    if isinstance(k, (list, pydicom.multival.MultiValue)):
        k = "\\".join(str(v) for v in k)
    return str(k)
