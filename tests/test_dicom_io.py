"""calcjax.io.dicom on real scanner files (pydicom's and pydicom-data's) and on phantoms."""

from __future__ import annotations

import copy
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from calcjax.io import dicom, dicom_series

TEST_FILES = os.path.dirname(get_testdata_file("CT_small.dcm"))
DIRTESTS = os.path.join(TEST_FILES, "dicomdirtests")
DATA_STORE = os.path.dirname(get_testdata_file("eCT_Supplemental.dcm"))


def rescaled(ds):
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def stack_of(path, folder, n=3, dz=2.5, shuffle=True):
    """Writes a series of ``n`` copies of one real slice at z, z+dz, ... (new UIDs), in a scrambled order."""
    os.makedirs(folder, exist_ok=True)
    src = pydicom.dcmread(path)
    series_uid = generate_uid()
    order = [2, 0, 1] + list(range(3, n)) if shuffle and n >= 3 else list(range(n))
    for i, k in enumerate(order):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + k * dz]
        ds.InstanceNumber = i + 1
        ds.save_as(os.path.join(folder, f"slice{i:03d}.dcm"), enforce_file_format=True)
    return src


def test_real_axial_series_sorted_by_position_not_instance_number():
    files = glob.glob(os.path.join(DIRTESTS, "98892001", "CT5N", "*"))
    vol = dicom.read_series(files)
    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    assert vol.hu.shape == (5, 16, 16) and vol.spacing[0] == pytest.approx(2.5)
    np.testing.assert_array_equal(vol.hu, np.stack([rescaled(d) for d in dss]))
    assert [int(d.InstanceNumber) for d in dss] == [10, 9, 8, 7, 6]  # instance order is descending z
    assert vol.meta["kvp"] == 120 and vol.meta["manufacturer"] == "GE MEDICAL SYSTEMS"


def test_localizers_gaps_and_non_ct_are_refused_with_reasons():
    with pytest.raises(dicom.SingleSliceError, match="only localizer"):
        dicom.read_series(glob.glob(os.path.join(DIRTESTS, "98892001", "CT2N", "*")))
    with pytest.raises(dicom.GeometryError, match="gap"):
        dicom.read_series(glob.glob(os.path.join(DIRTESTS, "77654033", "CT2", "*")))
    mr = glob.glob(os.path.join(DIRTESTS, "98892003", "MR700", "*"))
    with pytest.raises(dicom.NotCTError, match="Modality is MR") as e:
        dicom.read_series(mr)
    assert e.value.path in mr


def test_find_series_groups_by_uid_and_skips_dicomdir():
    series, bad = dicom_series.find_series(DIRTESTS)
    assert not any("DICOMDIR" in e.path for e in bad)
    ct = [s for s in series if s.modality == "CT"]
    assert sorted(len(s.files) for s in ct) == [2, 4, 5, 50]
    assert len({s.uid for s in series}) == len(series)


def test_enhanced_ct_from_functional_groups():
    path = os.path.join(DATA_STORE, "eCT_Supplemental.dcm")
    vol = dicom.read_series([path])
    ds = pydicom.dcmread(path)
    assert vol.meta["enhanced"] and vol.hu.shape == (2, 512, 512)
    frames = ds.PerFrameFunctionalGroupsSequence
    iop = np.asarray(
        ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float
    )
    normal = np.cross(iop[:3], iop[3:])
    z = [float(np.dot(normal, f.PlanePositionSequence[0].ImagePositionPatient)) for f in frames]
    assert vol.spacing[0] == pytest.approx(abs(z[1] - z[0]))
    trans = frames[0].get("PixelValueTransformationSequence") or ds.SharedFunctionalGroupsSequence[0].get(
        "PixelValueTransformationSequence"
    )
    slope = float(trans[0].RescaleSlope) if trans else 1.0
    intercept = float(trans[0].RescaleIntercept) if trans else 0.0
    order = np.argsort(z)
    np.testing.assert_allclose(vol.hu, ds.pixel_array[order] * slope + intercept)


def test_512_ct_with_padding_maps_padding_to_air(tmp_path):
    src = stack_of(os.path.join(DATA_STORE, "693_UNCR.dcm"), tmp_path / "s")
    vol = dicom.read_series(str(tmp_path / "s"))
    raw = src.pixel_array
    expected = np.where(raw == src.PixelPaddingValue, -1000, rescaled(src))
    assert (raw == src.PixelPaddingValue).any()
    for k in range(3):
        np.testing.assert_array_equal(vol.hu[k], expected)
    assert vol.hu.dtype == np.int16 and vol.spacing[0] == pytest.approx(2.5)


def test_jpeg2000_decodes_with_the_codecs_extra(tmp_path):
    stack_of(os.path.join(DATA_STORE, "693_UNCR.dcm"), tmp_path / "u")
    stack_of(os.path.join(DATA_STORE, "693_J2KR.dcm"), tmp_path / "j")
    np.testing.assert_array_equal(
        dicom.read_series(str(tmp_path / "j")).hu, dicom.read_series(str(tmp_path / "u")).hu
    )


def test_missing_codec_names_the_extra(tmp_path):
    stack_of(os.path.join(DATA_STORE, "693_J2KR.dcm"), tmp_path / "j")
    code = (
        "import sys\n"
        "for m in ('openjpeg', 'gdcm', 'pylibjpeg', 'PIL', 'libjpeg', 'rle'):\n"
        "    sys.modules[m] = None\n"
        "from calcjax.io import dicom\n"
        f"try:\n    dicom.read_series({str(tmp_path / 'j')!r})\n"
        "except dicom.MissingCodecError as e:\n    print('MISSING', e.reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "MISSING" in out and "calcjax[codecs]" in out


def test_ct_small_stack_from_a_real_slice(tmp_path):
    src = stack_of(get_testdata_file("CT_small.dcm"), tmp_path / "s", n=4, dz=5.0)
    vol = dicom.read_series(str(tmp_path / "s"))
    assert vol.hu.shape == (4, 128, 128) and vol.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    np.testing.assert_array_equal(vol.hu[0], rescaled(src))
    with pytest.raises(dicom.SingleSliceError, match="one slice"):
        dicom.read_series([get_testdata_file("CT_small.dcm")])


def write_variant(folder, src, name, **changes):
    ds = copy.deepcopy(src)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(os.path.join(folder, name), enforce_file_format=True)


def test_duplicates_tilt_spacing_matrix_and_bad_files(tmp_path):
    base = tmp_path / "base"
    src = stack_of(get_testdata_file("CT_small.dcm"), base, n=4, dz=5.0, shuffle=False)
    files = sorted(glob.glob(str(base / "*.dcm")))
    # An identical duplicate is dropped.
    dup = tmp_path / "dup"
    shutil.copytree(base, dup)
    shutil.copy(files[1], dup / "copy.dcm")
    assert dicom.read_series(str(dup)).hu.shape[0] == 4
    # A different slice at the same position is refused.
    ds = pydicom.dcmread(files[1])
    ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(dup / "other.dcm")
    with pytest.raises(dicom.GeometryError, match="same position"):
        dicom.read_series(str(dup))
    # Non-uniform spacing.
    uneven = tmp_path / "uneven"
    shutil.copytree(base, uneven)
    d = pydicom.dcmread(files[3])
    d.ImagePositionPatient = [*d.ImagePositionPatient[:2], float(d.ImagePositionPatient[2]) + 1.0]
    d.save_as(os.path.join(uneven, os.path.basename(files[3])))
    with pytest.raises(dicom.GeometryError, match="non-uniform"):
        dicom.read_series(str(uneven))
    # Gantry tilt.
    tilt = tmp_path / "tilt"
    tilt.mkdir()
    for i, f in enumerate(files):
        d = pydicom.dcmread(f)
        x, y, z = (float(v) for v in d.ImagePositionPatient)
        d.ImagePositionPatient = [x, y + 2.0 * i, z]
        d.save_as(tilt / os.path.basename(f))
    with pytest.raises(dicom.GeometryError, match="gantry tilt"):
        dicom.read_series(str(tilt))
    # A matrix that changes inside the series.
    mixed = tmp_path / "matrix"
    shutil.copytree(base, mixed)
    d = pydicom.dcmread(files[2])
    crop = d.pixel_array[:64, :64].copy()
    d.Rows = d.Columns = 64
    d.PixelData = crop.tobytes()
    d.save_as(os.path.join(mixed, os.path.basename(files[2])))
    with pytest.raises(dicom.InconsistentSeriesError, match="matrix"):
        dicom.read_series(str(mixed))
    # Truncated and not-DICOM files name the file.
    trunc = tmp_path / "trunc"
    shutil.copytree(base, trunc)
    victim = os.path.join(trunc, os.path.basename(files[0]))
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) - 5000])
    with pytest.raises(dicom.TruncatedError) as e:
        dicom.read_series(str(trunc))
    assert e.value.path == victim
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(dicom.NotDicomError) as e:
        dicom.read_series([str(junk)])
    assert e.value.path == str(junk)
    assert src.Modality == "CT"


def test_phantom_round_trip_protocol_and_no_identifiers_in_meta(phantom_dir):
    for protocol, (scan, folder) in phantom_dir.items():
        vol = dicom.read_series(os.path.join(folder, "dicom"))
        np.testing.assert_array_equal(vol.hu, scan.hu)
        assert vol.spacing == pytest.approx(scan.grid.spacing)
        np.testing.assert_allclose(vol.grid.origin, scan.grid.origin, atol=1e-3)
        assert vol.meta["protocol"] == protocol
        assert vol.meta["gated"] == (protocol == "cardiac")
        assert vol.meta["slice_thickness_mm"] == scan.acquisition.thickness_mm
        text = repr(vol.meta)
        assert "Phantom" not in text and "CJX-PID" not in text
        assert (
            dicom.read_series(os.path.join(folder, "dicom"), protocol="unknown").meta["protocol"] == "unknown"
        )


def test_read_series_agrees_with_simpleitk(phantom_dir):
    sitk = pytest.importorskip("SimpleITK")
    for _, folder in phantom_dir.values():
        series_dir = os.path.join(folder, "dicom")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(series_dir))
        image = reader.Execute()
        theirs = sitk.GetArrayFromImage(image)  # (z, y, x), rescaled; padding not masked
        ours = dicom.read_series(series_dir)
        assert theirs.shape == ours.hu.shape
        padding = theirs == -2000 - 1024
        np.testing.assert_array_equal(ours.hu[~padding], theirs[~padding])
        assert (ours.hu[padding] == -1000).all()
        np.testing.assert_allclose(image.GetSpacing()[::-1], ours.spacing, rtol=1e-5)
        np.testing.assert_allclose(image.GetOrigin(), ours.grid.origin, atol=1e-3)
