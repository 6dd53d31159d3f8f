"""Every refusal of the DICOM reader names the file, the attribute (or the part of the file) and the rule;
never a bare Python exception. Each case mutates every file of a small phantom series one way."""

from __future__ import annotations

import glob
import logging
import os
import shutil

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from bench import fuzz_mutations
from calcjax.io import dicom
from data_prep.phantom.generator import generate_scan, write_scan


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The DICOM folder of one 64x64 cardiac phantom."""
    base = tmp_path_factory.mktemp("refusals")
    folder = write_scan(
        generate_scan(5, 0, "cardiac", size=64, target_category=2), str(base), seed=5, index=0
    )
    return os.path.join(folder, "dicom")


def _mutated(series, tmp_path, change) -> str:
    """A copy of the series with ``change(ds)`` applied to every file; ``change`` may return one
    ``{keyword: text}`` to write as raw text (:func:`_raw`)."""
    out = str(tmp_path / "series")
    shutil.copytree(series, out)
    for path in sorted(glob.glob(os.path.join(out, "*.dcm"))):
        ds = pydicom.dcmread(path)
        raw = change(ds)
        if not raw:
            ds.save_as(path, enforce_file_format=True)
            continue
        ((keyword, text),) = raw.items()  # bytes_with_raw_text writes one attribute as raw text
        with open(path, "wb") as f:
            f.write(fuzz_mutations.bytes_with_raw_text(ds, keyword, text))
    return out


def _raw(keyword: str, text: str):
    """A change that writes ``text`` as the attribute's value byte for byte, as a damaged file holds it
    (pydicom refuses to set such a value, and meets it only when the reader asks for it)."""
    return lambda ds: {keyword: text}


def _rgb(ds):
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"


CASES = {
    "pixel spacing 0": (lambda ds: setattr(ds, "PixelSpacing", ["0", "0"]), "geometry",
                        r"PixelSpacing must be > 0 and <= 20 mm, got 0\\0"),
    "negative pixel spacing": (lambda ds: setattr(ds, "PixelSpacing", ["-0.5", "-0.5"]), "geometry",
                               r"PixelSpacing must be > 0 and <= 20 mm"),
    "NaN pixel spacing": (lambda ds: setattr(ds, "PixelSpacing", ["NaN", "0.5"]), "geometry",
                          r"PixelSpacing holds a value that is not finite"),
    "infinite position": (lambda ds: setattr(ds, "ImagePositionPatient", ["0", "inf", "1"]), "geometry",
                          r"ImagePositionPatient holds a value that is not finite"),
    "NaN orientation": (lambda ds: setattr(ds, "ImageOrientationPatient", ["NaN", 0, 0, 0, 1, 0]), "geometry",
                        r"ImageOrientationPatient holds a value that is not finite"),
    "pixel spacing text": (_raw("PixelSpacing", "abc\\0.5"), "geometry",
                           r"PixelSpacing is missing or not numeric"),
    "rescale slope text": (_raw("RescaleSlope", "one"), "bad_rescale",
                           r"RescaleSlope 'one' is not a number"),
    "RGB claimed": (_rgb, "not_ct", r"SamplesPerPixel 3 / PhotometricInterpretation RGB"),
    "palette colour": (lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"), "not_ct",
                       r"PhotometricInterpretation PALETTE COLOR"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_damaged_attribute_is_refused_naming_it(series, tmp_path, name):
    change, kind, reason = CASES[name]
    folder = _mutated(series, tmp_path, change)
    with pytest.raises(dicom.DicomError, match=reason) as info:
        dicom.read_series(folder)
    assert info.value.kind == kind and folder in str(info.value)


def test_an_unusable_slice_thickness_is_reported_as_absent_and_changes_no_geometry(series, tmp_path):
    """SliceThickness is metadata (the positions give the spacing): "abc", 0 or -3 read as absent."""
    good = dicom.read_series(series)
    for value in ("abc", "0", "-3"):
        folder = _mutated(series, tmp_path / value, _raw("SliceThickness", value))
        vol = dicom.read_series(folder)
        assert vol.meta["slice_thickness_mm"] is None and vol.grid == good.grid
        assert (vol.hu == good.hu).all()


@pytest.mark.parametrize(
    "syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless], ids=["jpeg2000", "jpeg-ls", "rle"]
)
def test_corrupt_compressed_data_is_diagnosed_as_corrupt_not_as_a_missing_codec(series, tmp_path, syntax,
                                                                                  caplog):  # fmt: skip
    """The codecs are installed and tried: the refusal says the data are corrupt, names the decoders'
    answers, and pydicom's per-plugin tracebacks stay out of the log."""
    folder = str(tmp_path / "series")
    shutil.copytree(series, folder)
    victim = sorted(glob.glob(os.path.join(folder, "*.dcm")))[2]
    ds = pydicom.dcmread(victim)
    ds.compress(syntax)
    data = bytearray(ds.PixelData)
    data[len(data) // 2 : len(data) // 2 + 40] = bytes(range(40))
    ds.PixelData = bytes(data[: 2 * len(data) // 3])
    ds.save_as(victim)
    with caplog.at_level(logging.DEBUG), pytest.raises(dicom.DicomError) as info:
        dicom.read_series(folder)
    assert info.value.kind == "corrupt_pixel_data", str(info.value)
    assert "corrupt compressed pixel data" in str(info.value) and victim in str(info.value)
    assert "calcjax[codecs]" not in str(info.value)
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_kvp_specific_threshold_without_a_kvp_is_an_error_naming_the_attribute():
    from calcjax.core import agatston

    assert agatston.threshold_for(None) == agatston.CALCIUM_THRESHOLD_HU  # the default never reads it
    with pytest.raises(ValueError, match=r"no usable KVP \(0018,0060\)"):
        agatston.threshold_for(None, kvp_specific_threshold=True)
