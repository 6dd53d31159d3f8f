"""DICOM headers as the reader meets them: reading one file with clear refusals, pydicom's warnings counted
instead of printed (values cut out), the identifying values to redact, and what identifies a series
physically when it has no SeriesInstanceUID. No jax here."""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import warnings

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from calcjax.io.dicom_errors import NotDicomError, TruncatedError

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


def read_dataset(path: str, *, headers_only: bool) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only)
    except InvalidDicomError as e:
        raise NotDicomError(path, f"not a DICOM file ({e.__class__.__name__})") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        reason = str(e).split("\n")[0][:200]
        if isinstance(e, EOFError) or "end of file" in reason.lower() or "truncat" in reason.lower():
            raise TruncatedError(path, f"truncated file ({reason})") from None
        raise NotDicomError(path, f"unreadable DICOM ({e.__class__.__name__}: {reason})") from None


def patient_id(path: str) -> str:
    """The PatientID of a DICOM file, stripped ("" when absent or unreadable): a grouping key held in memory
    for patient-level splits, never written."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # a file that find_series read moments ago; unreadable now means no key, not a crash
        return ""
    return str(ds.get("PatientID", "") or "").strip()


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


def position_along_normal(ds: pydicom.Dataset) -> float | None:
    try:
        ori = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient], np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if ori.size != 6 or pos.size != 3:
        return None
    return float(pos @ np.cross(ori[:3], ori[3:]))
