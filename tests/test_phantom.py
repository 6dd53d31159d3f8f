"""The phantom generator: DICOM series, NIfTI label grid, COCA XML ROIs, truth.json, coverage."""

from __future__ import annotations

import glob
import json
import os
import plistlib
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from agatston_reference import independent_agatston
from matplotlib.path import Path
from scipy import ndimage

from data_prep.phantom import annotations
from data_prep.phantom.generator import generate_scan

ARTERY_BY_NAME = {v: k for k, v in annotations.COCA_NAMES.items()}


def read_series_sorted(folder):
    """Minimal independent reader: sort by position along the normal, apply rescale, mask padding."""
    dss = [pydicom.dcmread(p) for p in glob.glob(os.path.join(folder, "dicom", "*.dcm"))]
    iop = np.asarray(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
    vols = []
    for d in dss:
        raw = d.pixel_array
        hu = raw.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)
        hu[raw == d.PixelPaddingValue] = np.nan
        vols.append(hu)
    return dss, np.stack(vols)


def test_series_reads_back_sorted_with_written_hu(phantom_dir):
    for scan, folder in phantom_dir.values():
        dss, vol = read_series_sorted(folder)
        assert len(dss) == scan.hu.shape[0]
        d0 = dss[0]
        assert d0.SOPClassUID == pydicom.uid.CTImageStorage and d0.Modality == "CT"
        assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.StudyInstanceUID for d in dss}) == 1
        assert len({d.SOPInstanceUID for d in dss}) == len(dss)
        assert str(d0.PatientName).startswith("Phantom^") and d0.PatientID.startswith("CJX-PID-")
        assert float(d0.KVP) == scan.acquisition.kvp
        assert float(d0.SliceThickness) == scan.acquisition.thickness_mm
        assert float(d0.RescaleIntercept) == -1024 and d0.PixelPaddingValue == -2000
        # File names / InstanceNumbers are not in ascending z.
        names = sorted(os.path.basename(d.filename) for d in dss)
        by_name_z = [
            float(pydicom.dcmread(os.path.join(folder, "dicom", n)).ImagePositionPatient[2]) for n in names
        ]
        assert by_name_z != sorted(by_name_z)
        # Pixel values: equal inside the field of view, padding outside it.
        inside = ~np.isnan(vol)
        np.testing.assert_array_equal(vol[inside], scan.hu[inside])
        assert 0.1 < (~inside[0]).mean() < 0.3  # corners outside the circular FOV
        zs = [float(d.ImagePositionPatient[2]) for d in dss]
        np.testing.assert_allclose(np.diff(zs), scan.acquisition.increment_mm, atol=1e-3)


def test_nifti_label_lies_on_the_image_grid(phantom_dir):
    for scan, folder in phantom_dir.values():
        img = nib.load(os.path.join(folder, "label.nii.gz"))
        data = np.asarray(img.dataobj)
        assert data.shape == scan.label.shape[::-1]
        np.testing.assert_array_equal(data.transpose(2, 1, 0), scan.label)
        dss, _ = read_series_sorted(folder)
        k, r, c = np.argwhere(scan.label > 0)[0]
        d = dss[k]
        ipp = np.asarray(d.ImagePositionPatient, float)
        iop = np.asarray(d.ImageOrientationPatient, float)
        dy, dx = (float(v) for v in d.PixelSpacing)
        world_lps = ipp + c * dx * iop[:3] + r * dy * iop[3:]
        world_ras = (img.affine @ np.array([c, r, k, 1.0]))[:3]
        np.testing.assert_allclose(world_ras * np.array([-1, -1, 1]), world_lps, atol=1e-3)


def rasterise_coca(xml_path, shape, slice_z, pixel_area_mm2):
    """Independent COCA plist rasteriser: slice by Point_mm z, pixel centres at integer Point_px."""
    with open(xml_path, "rb") as f:
        plist = plistlib.load(f)
    out = np.zeros(shape, dtype=np.uint8)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    centres = np.stack([xx.ravel(), yy.ravel()], axis=1)
    for image in plist["Images"]:
        assert image["NumberOfROIs"] == len(image["ROIs"])
        for roi in image["ROIs"]:
            px = [tuple(float(v) for v in re.findall(r"[-\d.]+", p)) for p in roi["Point_px"]]
            mm = [tuple(float(v) for v in re.findall(r"[-\d.]+", p)) for p in roi["Point_mm"]]
            k = int(np.argmin(np.abs(slice_z - mm[0][2])))
            assert k == image["ImageIndex"]
            inside = Path(px).contains_points(centres).reshape(shape[1:])
            assert inside.sum() * pixel_area_mm2 / 100.0 == pytest.approx(roi["Area"], rel=1e-9)  # cm^2
            out[k][inside] = ARTERY_BY_NAME[roi["Name"]]
    return out


def test_coca_xml_rasterises_back_to_the_label(phantom_dir):
    for scan, folder in phantom_dir.values():
        slice_z = np.array([scan.grid.slice_position(k)[2] for k in range(scan.hu.shape[0])])
        pixel_area = scan.grid.spacing[1] * scan.grid.spacing[2]
        raster = rasterise_coca(os.path.join(folder, "calcium.xml"), scan.label.shape, slice_z, pixel_area)
        raster[scan.hu < 130] = 0  # a reader drops voxels under 130 HU inside an ROI
        assert (scan.label > 0).sum() > 0
        np.testing.assert_array_equal(raster, scan.label)


def test_outline_loops_give_back_every_mask():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    centres = np.stack([xx.ravel(), yy.ravel()], axis=1)
    for _ in range(200):
        mask = ndimage.binary_fill_holes(rng.uniform(size=(24, 24)) < rng.uniform(0.2, 0.7))
        raster = np.zeros_like(mask)
        for loop in annotations.outline_loops(mask):
            raster |= Path(loop).contains_points(centres).reshape(mask.shape)
        np.testing.assert_array_equal(raster, mask)


def test_truth_json_matches_an_independent_agatston(phantom_dir):
    for scan, folder in phantom_dir.values():
        with open(os.path.join(folder, "truth.json")) as f:
            truth = json.load(f)
        total, per, _, _ = independent_agatston(scan.hu, scan.label, scan.grid.spacing)
        assert total > 0
        assert truth["reference"]["agatston"] == pytest.approx(total, rel=1e-9)
        for i, name in enumerate(("LM", "LAD", "LCX", "RCA")):
            assert truth["reference"]["agatston_per_artery"][name] == pytest.approx(
                per[i], rel=1e-9, abs=1e-9
            )
        assert truth["protocol"] == scan.acquisition.protocol
        assert truth["lesions"] and {les["artery"] for les in truth["lesions"]} <= {"LM", "LAD", "LCX", "RCA"}


def test_bone_above_threshold_outnumbers_calcium(phantom_dir):
    for scan, _ in phantom_dir.values():
        calcium = (scan.label > 0).sum()
        outside = ((scan.hu >= 130) & (scan.label == 0)).sum()
        assert outside > 10 * calcium


def test_same_seed_gives_identical_pixels_and_files(tmp_path):
    a = generate_scan(11, 1, "cardiac", size=64)
    b = generate_scan(11, 1, "cardiac", size=64)
    np.testing.assert_array_equal(a.stored, b.stored)
    np.testing.assert_array_equal(a.label, b.label)
    c = generate_scan(12, 1, "cardiac", size=64)
    assert not np.array_equal(a.stored, c.stored)


def test_cli_writes_scans_and_keeps_finished_ones(tmp_path):
    out = tmp_path / "ph"
    cmd = [
        sys.executable,
        "-m",
        "data_prep.phantom",
        "--out",
        str(out),
        "--scans",
        "2",
        "--size",
        "64",
        "--seed",
        "5",
        "--preview",
        str(tmp_path / "p.png"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["phantom-s5-0000-cardiac", "phantom-s5-0001-chest"]
    for f in folders:
        assert {"dicom", "label.nii.gz", "calcium.xml", "truth.json"} <= set(os.listdir(out / f))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert str(out) in run.stdout
    before = os.path.getmtime(out / folders[0] / "truth.json")
    subprocess.run(cmd[:-2], capture_output=True, text=True, check=True)
    assert os.path.getmtime(out / folders[0] / "truth.json") == before


def _v2_draws(count: int, version: int):
    """Lesion plans of ``count`` random patients (category 3, gated), without rendering."""
    from data_prep.phantom import calcium
    from data_prep.phantom.acquisition import sample_acquisition
    from data_prep.phantom.anatomy import coronary_centerlines, sample_patient

    out = []
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([20261130, i]))
        acq = sample_acquisition("cardiac", rng, 128)
        coronaries = coronary_centerlines(sample_patient(rng))
        out.append((calcium.plan_lesions(3, coronaries, acq, rng, version), coronaries))
    return out


def test_phantom_v2_plaques_are_clustered_along_one_vessel_and_peak_lower():
    """Phantom v2: a share of lesions become runs of 2-4 overlapping blobs on one artery, next
    to each other along it; the target peaks are lower than v1's (the real sample's median is 306 HU)."""
    from data_prep.phantom import calcium

    v1, v2 = _v2_draws(40, 1), _v2_draws(40, 2)

    def neighbours(draws) -> int:
        """Consecutive lesions on one artery less than their combined length apart."""
        n = 0
        for blobs, coronaries in draws:
            big = [b for b in blobs if b.scalable]
            for a, b in zip(big, big[1:], strict=False):
                if a.artery == b.artery and np.linalg.norm(a.centre - b.centre) < 2 * (
                    a.semi_mm[0] + b.semi_mm[0]
                ):
                    n += 1
                    assert np.linalg.norm(coronaries[a.artery].points - b.centre, axis=1).min() < 3.0
        return n

    assert neighbours(v2) >= 60 and neighbours(v1) <= 20  # measured: 167 and 7
    assert sum(len(b) for b, _ in v2) > sum(len(b) for b, _ in v1)
    peaks = [np.median([b.target_peak_hu for b in blobs]) for blobs, _ in v2]
    peaks_v1 = [np.median([b.target_peak_hu for b in blobs]) for blobs, _ in v1]
    assert np.median(peaks) < np.median(peaks_v1)
    assert all(b.target_peak_hu <= calcium.MAX_DENSITY_HU for blobs, _ in v2 for b in blobs)


def test_phantom_v2_scan_reaches_its_category_with_v2_noise_and_says_its_version():
    from data_prep.phantom import generator

    scan = generate_scan(11, 3, "chest", size=96, target_category=3, version=2)
    truth = scan.truth
    assert truth["phantom_version"] == 2 and truth["reference"]["risk_category"] == 3
    lo, hi = generator.V2_NOISE_SD_HU["chest"]
    assert lo <= truth["acquisition"]["noise_sd_hu"] <= hi
    assert generate_scan(11, 3, "chest", size=96, target_category=3).truth["phantom_version"] == 1
    with pytest.raises(ValueError, match="phantom version 5"):
        generate_scan(11, 3, "chest", size=96, version=5)
