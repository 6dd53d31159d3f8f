"""Reading CT series as PACS exports deliver them: series discovery, sorting, rescaling, validation.

- ``find_series(root)`` walks a folder tree, reads headers only, and groups files by SeriesInstanceUID
  (several series in one folder are normal); unreadable files come back as :class:`DicomError` entries.
  Files without a SeriesInstanceUID (research exports such as the COCA non-gated release) are grouped by
  what identifies a series physically (:func:`physical_series_key`) and marked ``grouping="geometry"``.
- pydicom's per-file warnings (invalid UIDs, over-long values, ...) are never printed per file: they are
  counted per series, with the offending values cut out (:class:`ReaderWarnings`).
- ``read_series(files) -> Volume``: HU ``(z, y, x)`` with z ascending along the slice normal, spacing
  ``(dz, dy, dx)`` mm with dz from the real position differences, LPS origin and direction cosines, and
  non-identifying metadata (kVp, slice thickness, protocol guess, manufacturer, kernel).

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

import collections
import contextlib
import dataclasses
import logging
import os
import re
import warnings
from collections import defaultdict

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from calcjax.core.hu import AIR_HU, CARDIAC_FOV_MAX_MM, CHEST_FOV_MIN_MM
from calcjax.io.errors import InputError
from calcjax.io.geometry import Grid

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
SPACING_TOLERANCE = 0.01  # relative deviation of a gap from the median gap still called uniform
ORIENTATION_TOLERANCE = 1e-3  # max abs difference of direction cosines within one series
GATING_TAGS = (
    "TriggerTime",
    "CardiacSynchronizationTechnique",
    "NominalCardiacTriggerDelayTime",
    "HeartRate",
)


class DicomError(InputError):
    """A file or series that cannot be read as CT, with the file and the reason."""


class NotDicomError(DicomError):
    kind = "not_dicom"


class TruncatedError(DicomError):
    kind = "truncated"


class NoPixelDataError(DicomError):
    kind = "no_pixel_data"


class NotCTError(DicomError):
    kind = "not_ct"


class SingleSliceError(DicomError):
    kind = "single_slice"


class InconsistentSeriesError(DicomError):
    kind = "inconsistent_series"


class GeometryError(DicomError):
    kind = "geometry"


class MixedThicknessError(DicomError):
    """Slices of one series with different SliceThickness: one thickness per scan is what Agatston's
    equivalent-score rule and the manifest assume, so such a series is refused, not recorded as its first."""

    kind = "mixed_slice_thickness"


THICKNESS_TOLERANCE_MM = 0.01
OUTPUT_FOLDER_MARKER = ".calcjax.lock"
"""The lock file every calcjax output folder holds (``calcjax.io.outputs.FolderLock``): a folder with one is a
job's output (shards, scores), never searched as input."""


class MissingCodecError(DicomError):
    kind = "missing_codec"


class RescaleError(DicomError):
    kind = "bad_rescale"


MAX_ABS_RESCALE_SLOPE = 100.0  # CT slopes are 1 (sometimes 0.5 or 2); beyond this a header is damaged
MAX_ABS_RESCALE_INTERCEPT = 100_000.0  # CT intercepts are -1024, -8192, 0 ...


def _rescale(slope, intercept, path: str) -> tuple[float, float]:
    """``(slope, intercept)`` as floats; missing values default to 1 and 0. A non-numeric, non-finite,
    zero or absurd value (beyond ``MAX_ABS_RESCALE_*``) is refused: it would turn every pixel into a wrong
    HU (NaN reads as 0 HU, 1e30 as 32767 HU) and a wrong score, never an error."""
    out = []
    for name, value, default in (("RescaleSlope", slope, 1.0), ("RescaleIntercept", intercept, 0.0)):
        if value in (None, ""):
            out.append(default)
            continue
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise RescaleError(path, f"{name} {str(value)[:40]!r} is not a number") from None
        out.append(x)
    s, i = out
    if not (np.isfinite(s) and np.isfinite(i)):
        raise RescaleError(path, f"non-finite rescale (RescaleSlope {s}, RescaleIntercept {i})")
    if s == 0 or abs(s) > MAX_ABS_RESCALE_SLOPE or abs(i) > MAX_ABS_RESCALE_INTERCEPT:
        raise RescaleError(
            path,
            f"implausible rescale for CT (RescaleSlope {s:g}, RescaleIntercept {i:g}; expected a slope in "
            f"(0, {MAX_ABS_RESCALE_SLOPE:g}] and |intercept| <= {MAX_ABS_RESCALE_INTERCEPT:g})",
        )
    return s, i


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


@dataclasses.dataclass(frozen=True)
class SeriesFiles:
    """Files of one series found by :func:`find_series` (``uid`` stays in memory; never log it).

    Attributes:
      uid: the SeriesInstanceUID, or for a series grouped without one (``grouping == "geometry"``) a key
        built from its folder (relative to the searched root) and :func:`physical_series_key`; either way
        the input of the salted scan id, never written anywhere.
      folder, files, modality: where the series lies, its files (sorted), its Modality.
      identifiers: identifying header values to redact from messages about it.
      grouping: ``uid`` (by SeriesInstanceUID) or ``geometry`` (no UID in the files).
      reader_warnings: ``((message, count), ...)``: pydicom's warnings while reading its headers, the
        offending values cut out.
    """

    uid: str
    folder: str
    files: tuple[str, ...]
    modality: str
    identifiers: frozenset[str] = frozenset()
    grouping: str = "uid"
    reader_warnings: tuple[tuple[str, int], ...] = ()


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _warning_text(message: str) -> str:
    """A pydicom warning without the values it quotes (they can be UIDs) or its documentation link."""
    text = _QUOTED.sub("'...'", str(message).split("\n")[0])
    return text.split(" Please see")[0].split(" See ")[0].strip().rstrip(".")[:160]


class _DropPydicomRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


class ReaderWarnings:
    """Counts pydicom's warnings (``warnings.warn`` and its logger) instead of letting them print.

    Use as ``with counter.capture(): ...`` around header or pixel reads; ``counter.counts`` maps the
    value-free message to how often it came. Not thread-safe (``warnings.catch_warnings`` is process-wide);
    the readers run one file at a time per process.
    """

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def capture(self):
        drop = _DropPydicomRecords()
        logger = logging.getLogger("pydicom")
        logger.addFilter(drop)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield self
        finally:
            logger.removeFilter(drop)
        for w in caught:
            self.counts[_warning_text(w.message)] += 1

    def items(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        """``"114 reader warnings: 114 x Invalid value for VR UI: '...'"`` (empty when none)."""
        total = sum(self.counts.values())
        if not total:
            return ""
        return f"{total} reader warning(s): " + "; ".join(f"{n} x {m}" for m, n in self.items())


def warnings_summary(items) -> str:
    """:meth:`ReaderWarnings.summary` of ``((message, count), ...)`` pairs."""
    counter = ReaderWarnings()
    counter.counts.update(dict(items))
    return counter.summary()


IDENTIFYING_TAGS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstitutionName",
    "ReferringPhysicianName",
    "OperatorsName",
)


PERSON_NAME_TAGS = ("PatientName", "ReferringPhysicianName", "OperatorsName")


def identifying_values(ds: pydicom.Dataset) -> set[str]:
    """Identifying strings of a header (DICOM PS3.15 Annex E basic profile subset), for redaction.

    Person names also give their ``^``-separated components; strings shorter than 4 characters are left
    out (too common to redact safely).
    """
    out = set()
    for tag in IDENTIFYING_TAGS:
        value = ds.get(tag)
        if value in (None, ""):
            continue
        values = value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
        for v in values:
            text = str(v).strip()
            out.add(text)
            if tag in PERSON_NAME_TAGS:
                out.update(part for part in text.replace("^", " ").split() if part)
                out.add(text.replace("^", " ").strip())
    return {v for v in out if len(v) >= 4}


def _read(path: str, *, headers_only: bool) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only)
    except InvalidDicomError as e:
        raise NotDicomError(path, f"not a DICOM file ({e.__class__.__name__})") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        reason = str(e).split("\n")[0][:200]
        if isinstance(e, EOFError) or "end of file" in reason.lower() or "truncat" in reason.lower():
            raise TruncatedError(path, f"truncated file ({reason})") from None
        raise NotDicomError(path, f"unreadable DICOM ({e.__class__.__name__}: {reason})") from None


def physical_series_key(ds: pydicom.Dataset) -> tuple:
    """What identifies a series without a SeriesInstanceUID: FrameOfReferenceUID (when present), series
    number, orientation, pixel spacing, matrix, slice thickness and kernel (with the folder, which the
    caller adds).

    AcquisitionNumber is *not* part of it: an ECG-gated sequential ("step-and-shoot") scan gives each table
    position its own acquisition number inside one series (the COCA gated scans have 4-5 per series). It
    only splits a group whose slices collide in position (:func:`_split_colliding_acquisitions`).
    """

    def text(tag):
        value = ds.get(tag)
        if isinstance(value, (list, pydicom.multival.MultiValue)):
            return "\\".join(str(v) for v in value)
        return "" if value is None else str(value).strip()

    def rounded(tag, digits):
        try:
            return tuple(round(float(v), digits) for v in ds.get(tag) or ())
        except (TypeError, ValueError):
            return (text(tag),)

    return (
        text("FrameOfReferenceUID"),
        text("SeriesNumber"),
        rounded("ImageOrientationPatient", 3),
        rounded("PixelSpacing", 4),
        text("Rows"),
        text("Columns"),
        text("SliceThickness"),
        text("ConvolutionKernel"),
    )


def _position_along_normal(ds: pydicom.Dataset) -> float | None:
    try:
        ori = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient], np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if ori.size != 6 or pos.size != 3:
        return None
    return float(pos @ np.cross(ori[:3], ori[3:]))


def _split_colliding_acquisitions(members: list[tuple[str, str, float | None]]) -> list[list[str]]:
    """The files of one UID-less group, split by AcquisitionNumber only where that resolves slices at the
    same position (two acquisitions of the same range); otherwise one series. ``members``: (path,
    acquisition number, position along the normal)."""
    positions = [round(p, 2) for _, _, p in members if p is not None]
    if len(set(positions)) == len(positions):
        return [[m[0] for m in members]]
    by_acq: dict[str, list] = defaultdict(list)
    for m in members:
        by_acq[m[1]].append(m)
    if len(by_acq) > 1 and all(
        len({round(p, 2) for _, _, p in g if p is not None}) == sum(p is not None for _, _, p in g)
        for g in by_acq.values()
    ):
        return [[m[0] for m in g] for _, g in sorted(by_acq.items())]
    return [[m[0] for m in members]]  # read_series names the colliding slices


def find_series(root: str, exclude=()) -> tuple[list[SeriesFiles], list[DicomError]]:
    """Groups every DICOM file under ``root`` into series (headers only).

    By SeriesInstanceUID; files without one, by folder and :func:`physical_series_key` (marked
    ``grouping="geometry"``). Folder links are followed, each real folder searched once. Returns the
    series (sorted by folder, then file list) and the files that could not be read as DICOM. DICOMDIR
    index files are skipped silently. pydicom's warnings are counted per series
    (``SeriesFiles.reader_warnings``), never printed. Folders in ``exclude`` (the job's own output folder
    when it lies inside its input) and calcjax output folders (holding :data:`OUTPUT_FOLDER_MARKER`) are
    not searched.
    """
    excluded = {os.path.realpath(e) for e in exclude}
    groups: dict[str, list[str]] = defaultdict(list)
    modality: dict[str, str] = {}
    identifiers: dict[str, set[str]] = defaultdict(set)
    counters: dict[str, ReaderWarnings] = defaultdict(ReaderWarnings)
    no_uid: dict[tuple, list[tuple[str, str, float | None]]] = defaultdict(list)
    no_uid_info: dict[tuple, tuple[str, set[str], ReaderWarnings, dict[str, str]]] = {}
    bad: list[DicomError] = []
    seen_dirs: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        # Folder links are followed (a cohort is often assembled from links to patient folders); a folder
        # reached twice, through a link loop or two links to one place, is searched once.
        real = os.path.realpath(folder)
        if real in seen_dirs or real in excluded or OUTPUT_FOLDER_MARKER in files:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        for name in sorted(files):
            if name.upper() == "DICOMDIR" or name.startswith("."):
                continue
            path = os.path.join(folder, name)
            if not _looks_like_dicom(path):
                continue
            counter = ReaderWarnings()
            with counter.capture():
                try:
                    ds = _read(path, headers_only=True)
                except DicomError as e:
                    bad.append(e)
                    continue
                if (
                    str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY
                    or "DirectoryRecordSequence" in ds
                ):
                    continue  # a DICOMDIR index, not an image
                uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
                mod = str(ds.get("Modality", ""))
                ids = identifying_values(ds)
                if not uid:
                    if "SOPClassUID" not in ds and not mod:
                        bad.append(
                            NotDicomError(path, "no SeriesInstanceUID, SOPClassUID or Modality: not an image")
                        )
                        continue
                    key = (os.path.relpath(folder, root), mod) + physical_series_key(ds)
                    acq = str(ds.get("AcquisitionNumber", "") or "")
                    no_uid[key].append((path, acq, _position_along_normal(ds)))
                    info = no_uid_info.setdefault(key, (mod, set(), ReaderWarnings(), {}))
                    info[1].update(ids)
                    info[3][path] = str(ds.get("SOPInstanceUID", "") or "").strip()
            if not uid:
                no_uid_info[key][2].counts.update(counter.counts)
                continue
            groups[uid].append(path)
            modality[uid] = mod
            identifiers[uid] |= ids
            counters[uid].counts.update(counter.counts)
    series = [
        SeriesFiles(
            uid,
            os.path.commonpath([os.path.dirname(f) for f in files]),
            tuple(files),
            modality[uid],
            frozenset(identifiers[uid]),
            "uid",
            counters[uid].items(),
        )
        for uid, files in groups.items()
    ]
    for key, members in no_uid.items():
        mod, ids, counter, sop_uids = no_uid_info[key]
        parts = _split_colliding_acquisitions(members)
        for i, files in enumerate(parts):
            share = counter.counts if i == 0 else collections.Counter()
            files = sorted(files)
            sops = sorted(sop_uids[f] for f in files)
            # The grouping key (the scan id's input): the instances' own UIDs when every file has one, so a
            # scan keeps its id whichever folder above it is searched; else the folder-relative key.
            if all(sops):
                group_key = "nouid-instances:" + "|".join(sops)
            else:
                group_key = "nouid:" + repr(key) + (f"|acquisition-part-{i}" if len(parts) > 1 else "")
            series.append(
                SeriesFiles(
                    group_key,
                    os.path.commonpath([os.path.dirname(f) for f in files]),
                    tuple(files),
                    mod,
                    frozenset(ids),
                    "geometry",
                    tuple(sorted(share.items(), key=lambda kv: (-kv[1], kv[0]))),
                )
            )
    series.sort(key=lambda s: (s.folder, s.files))
    return series, bad


_NON_DICOM_SUFFIXES = (".json", ".xml", ".nii", ".nii.gz", ".png", ".txt", ".csv", ".md", ".jsonl", ".xlsx")


def _looks_like_dicom(path: str) -> bool:
    """Skips the label and report files that live beside series; everything else is tried."""
    return not path.lower().endswith(_NON_DICOM_SUFFIXES)


def _float_list(value, n: int, path: str, tag: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(path, f"{tag} is missing or not numeric") from None
    if out.size != n:
        raise GeometryError(path, f"{tag} has {out.size} values, expected {n}")
    return out


@dataclasses.dataclass
class _Frame:
    """One 2D image with its geometry and rescale, from a classic file or an Enhanced CT frame."""

    path: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    thickness: float | None
    slope: float
    intercept: float
    pixels: np.ndarray  # raw stored values (rows, cols)
    padding: tuple[int, int] | None


def _check_ct(ds: pydicom.Dataset, path: str) -> None:
    modality = str(ds.get("Modality", ""))
    sop = str(ds.get("SOPClassUID", ""))
    if modality != "CT":
        raise NotCTError(path, f"Modality is {modality or 'missing'}, not CT")
    if sop and sop not in CT_SOP_CLASSES:
        raise NotCTError(path, f"SOP class {UID(sop).name} is not a CT image")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NoPixelDataError(path, "no pixel data")


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian


def _native_pixels(ds: pydicom.Dataset, path: str) -> np.ndarray | None:
    """Uncompressed single-frame 16-bit pixels straight from the bytes (no decoder round trip), or None."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if ts not in _NATIVE_LE or ds.get("NumberOfFrames", 1) not in (1, "1", None):
        return None
    if ds.get("BitsAllocated") != 16 or ds.get("BitsStored") != 16 or ds.get("SamplesPerPixel", 1) != 1:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if len(data) < rows * cols * 2:
        raise TruncatedError(
            path, f"pixel data truncated ({len(data)} bytes for {rows}x{cols} 16-bit pixels)"
        )
    dtype = "<i2" if ds.get("PixelRepresentation", 0) == 1 else "<u2"
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)


def _pixels(ds: pydicom.Dataset, path: str) -> np.ndarray:
    native = _native_pixels(ds, path)
    if native is not None:
        return native
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError):
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = UID(str(ts)).name if ts else "unknown"
        raise MissingCodecError(
            path,
            f"cannot decode transfer syntax {name}: install the codecs extra (pip install 'calcjax[codecs]')",
        ) from None
    except ValueError as e:
        msg = str(e).split("\n")[0][:200]
        if any(k in msg.lower() for k in ("length", "doesn't match", "truncat", "less than expected")):
            raise TruncatedError(path, f"pixel data truncated ({msg})") from None
        raise NoPixelDataError(path, f"pixel data unreadable ({msg})") from None


def _padding(ds) -> tuple[int, int] | None:
    if "PixelPaddingValue" not in ds:
        return None
    a = int(ds.PixelPaddingValue)
    b = int(ds.get("PixelPaddingRangeLimit", a))
    return (min(a, b), max(a, b))


def _is_localizer(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type


def _classic_frames(ds: pydicom.Dataset, path: str) -> list[_Frame]:
    slope, intercept = _rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), path)
    return [
        _Frame(
            path=path,
            position=_float_list(ds.get("ImagePositionPatient"), 3, path, "ImagePositionPatient"),
            orientation=_float_list(ds.get("ImageOrientationPatient"), 6, path, "ImageOrientationPatient"),
            pixel_spacing=_float_list(ds.get("PixelSpacing"), 2, path, "PixelSpacing"),
            thickness=float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
            slope=slope,
            intercept=intercept,
            pixels=_pixels(ds, path),
            padding=_padding(ds),
        )
    ]


def _enhanced_frames(ds: pydicom.Dataset, path: str) -> list[_Frame]:
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

    pixels = _pixels(ds, path)
    pixels = pixels.reshape((n,) + pixels.shape[-2:])
    frames = []
    for i, fg in enumerate(per_frame):
        pos, ori, meas = (
            group(fg, "PlanePositionSequence"),
            group(fg, "PlaneOrientationSequence"),
            group(fg, "PixelMeasuresSequence"),
        )
        trans = group(fg, "PixelValueTransformationSequence")
        slope, intercept = _rescale(
            None if trans is None else trans.get("RescaleSlope"),
            None if trans is None else trans.get("RescaleIntercept"),
            path,
        )
        if pos is None or ori is None or meas is None:
            raise GeometryError(path, f"frame {i + 1}: plane position, orientation or pixel measures missing")
        frames.append(
            _Frame(
                path=path,
                position=_float_list(pos.get("ImagePositionPatient"), 3, path, "ImagePositionPatient"),
                orientation=_float_list(
                    ori.get("ImageOrientationPatient"), 6, path, "ImageOrientationPatient"
                ),
                pixel_spacing=_float_list(meas.get("PixelSpacing"), 2, path, "PixelSpacing"),
                thickness=float(meas.SliceThickness)
                if meas.get("SliceThickness") not in (None, "")
                else None,
                slope=slope,
                intercept=intercept,
                pixels=pixels[i],
                padding=_padding(ds),
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
    frames: list[_Frame] = []
    first = None
    localizers = 0
    counter = ReaderWarnings()
    for path in files:
        with counter.capture():
            ds = _read(path, headers_only=False)
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


def _drop_other_orientations(frames: list[_Frame]) -> tuple[list[_Frame], int]:
    """Keeps the frames with the series' majority orientation (scouts in a series differ)."""
    keys = [tuple(np.round(f.orientation, 3)) for f in frames]
    values, counts = np.unique(np.asarray(keys), axis=0, return_counts=True)
    major = values[np.argmax(counts)]
    kept = [f for f in frames if np.abs(f.orientation - major).max() <= 0.01]
    return kept, len(frames) - len(kept)


def _assemble(frames: list[_Frame], first: pydicom.Dataset, localizers: int, protocol: str | None) -> Volume:
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
        _rescale_into(hu[k], f, integral)
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


def _rescale_into(out: np.ndarray, f: _Frame, integral: bool) -> None:
    """HU of one frame into ``out``: padding (on stored values) to air, then slope and intercept."""
    raw = f.pixels
    if integral:
        icpt = int(f.intercept)
        lo, hi = int(raw.min()), int(raw.max())
        if (
            raw.dtype.kind in "iu"
            and raw.dtype.itemsize <= 2
            and hi <= 32767
            and -32768 <= lo + icpt
            and hi + icpt <= 32767
        ):
            out[...] = raw  # exact: every value fits int16, and so does every value + intercept
            out += np.int16(icpt)
        else:
            out[...] = np.clip(raw.astype(np.int32) + icpt, -32768, 32767)
    else:
        np.multiply(raw, np.float32(f.slope), out=out, casting="unsafe")
        out += np.float32(f.intercept)
    if f.padding is not None:
        a, b = f.padding
        np.putmask(out, raw == a if a == b else (raw >= a) & (raw <= b), AIR_HU)


def _metadata(ds, frames, grid: Grid, localizers: int, protocol: str | None) -> dict:
    fov = ds.get("ReconstructionDiameter")
    fov_mm = float(fov) if fov not in (None, "") else float(grid.shape[2] * grid.spacing[2])
    gated = any(ds.get(t) not in (None, "") for t in GATING_TAGS) or _enhanced_gated(ds)
    if protocol is None:
        if gated or fov_mm <= CARDIAC_FOV_MAX_MM:
            protocol = "cardiac"
        elif fov_mm >= CHEST_FOV_MIN_MM:
            protocol = "chest"
        else:
            protocol = "unknown"
    thickness = frames[0].thickness
    kvp = ds.get("KVP")
    return {
        "kvp": float(kvp) if kvp not in (None, "") else None,
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
