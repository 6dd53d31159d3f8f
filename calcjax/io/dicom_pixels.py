"""Stored pixels to HU: decoding (native 16-bit bytes directly, compressed syntaxes through the ``codecs``
extra), the rescale (checked: a wrong slope or intercept is a wrong score, never a number), and padding
mapped to air before the rescale. No jax here."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from calcjax.core.hu import AIR_HU
from calcjax.io.dicom_errors import (
    CorruptPixelDataError,
    MissingCodecError,
    NoPixelDataError,
    RescaleError,
    TruncatedError,
)


@dataclasses.dataclass
class Frame:
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


MAX_ABS_RESCALE_SLOPE = 100.0  # CT slopes are 1 (sometimes 0.5 or 2); beyond this a header is damaged


MAX_ABS_RESCALE_INTERCEPT = 100_000.0  # CT intercepts are -1024, -8192, 0 ...


def rescale_of(slope, intercept, path: str) -> tuple[float, float]:
    """``(slope, intercept)`` as floats. Both are required (Type 1 in the CT Image module, and in Enhanced
    CT's Pixel Value Transformation): without them HU are undefined, so a missing one is refused, as is a
    non-numeric, non-finite, zero or absurd value (beyond ``MAX_ABS_RESCALE_*``): each would turn every
    pixel into a wrong HU (a missing intercept reads air as +1024 HU, NaN as 0 HU, 1e30 as 32767 HU) and a
    wrong score, never an error."""
    out = []
    for name, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if value in (None, ""):
            raise RescaleError(path, f"{name} is missing: CT pixels without it have no defined HU")
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


# pydicom's warnings of a compressed stream that does not decode to what its header promises.
_DAMAGED = re.compile(
    r"non-conformant padding|segment|fewer bytes than expected|more bytes than expected", re.I
)

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


def stored_pixels(ds: pydicom.Dataset, path: str) -> np.ndarray:
    """The stored values of a file's image (before the rescale); a DicomError naming the file and the
    reason when they cannot be read: no decoder installed for the transfer syntax, compressed data the
    installed decoders could not decode, a truncated stream, or an attribute the decoder needs."""
    native = _native_pixels(ds, path)
    if native is not None:
        return native
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    name = UID(ts).name if ts else "unknown"
    try:
        with _quiet_decoders(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        if not _decoder_installed(ts):
            raise MissingCodecError(
                path,
                f"cannot decode transfer syntax {name}: no decoder for it is installed "
                "(pip install 'calcjax[codecs]')",
            ) from None
        raise CorruptPixelDataError(
            path, f"corrupt compressed pixel data ({name}): every installed decoder failed ({_plugins(e)})"
        ) from None
    except AttributeError as e:
        raise NoPixelDataError(
            path, f"pixel data cannot be decoded: {_named_element(_first_line(e))}"
        ) from None
    except ValueError as e:
        msg = _first_line(e)
        if any(k in msg.lower() for k in ("length", "doesn't match", "truncat", "less than expected")):
            raise TruncatedError(path, f"pixel data truncated ({msg})") from None
        raise NoPixelDataError(path, f"pixel data unreadable ({msg})") from None
    damaged = [str(w.message) for w in caught if _DAMAGED.search(str(w.message))]
    if damaged:  # RLE has no checksum: a damaged stream decodes to wrong pixels with only a warning
        raise CorruptPixelDataError(path, f"corrupt compressed pixel data ({name}): {damaged[0][:200]}")
    for w in caught:  # the others go on to the reader's warning count, as before
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pixels


def _first_line(e: Exception) -> str:
    return str(e).strip().split("\n")[0][:200]


def _plugins(e: Exception) -> str:
    """pydicom's "Unable to decode ... plugins:\n  gdcm: ...\n  pillow: ..." as one short line."""
    lines = [x.strip() for x in str(e).strip().split("\n")]
    return "; ".join(x for x in lines[1:] if x)[:300] or lines[0][:200]


def _named_element(message: str) -> str:
    """pydicom's "Missing required element (0028,0004)" with the element's keyword added."""
    m = re.search(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)", message)
    keyword = keyword_for_tag(int(m.group(1) + m.group(2), 16)) if m else ""
    return f"{message} ({keyword})" if keyword and keyword not in message else message


def _decoder_installed(transfer_syntax: str) -> bool:
    """Whether pydicom has a working decoder for the transfer syntax (so a failure is the data's)."""
    try:
        return bool(transfer_syntax) and get_decoder(UID(transfer_syntax)).is_available
    except (NotImplementedError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _quiet_decoders():
    """pydicom's decoders log each failing plugin's traceback; the refusal names the reason instead."""
    log = logging.getLogger("pydicom")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def padding_range(ds) -> tuple[int, int] | None:
    if "PixelPaddingValue" not in ds:
        return None
    a = int(ds.PixelPaddingValue)
    b = int(ds.get("PixelPaddingRangeLimit", a))
    return (min(a, b), max(a, b))


def rescale_into(out: np.ndarray, f: Frame, integral: bool) -> None:
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
