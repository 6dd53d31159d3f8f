"""The refusals of the DICOM reader: each names the file and the reason, with a short ``kind`` that batch jobs
record (``calcjax.io.errors.InputError``)."""

from __future__ import annotations

from calcjax.io.errors import InputError


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


class MissingCodecError(DicomError):
    kind = "missing_codec"


class CorruptPixelDataError(DicomError):
    """Compressed pixel data that the installed decoders were given and could not decode."""

    kind = "corrupt_pixel_data"


class RescaleError(DicomError):
    kind = "bad_rescale"
