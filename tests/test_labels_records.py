"""calcjax.io.labels (NIfTI, COCA XML) and calcjax.io.records (the shard record schema)."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from calcjax.io import dicom, labels, records


def test_nifti_label_reads_back_on_the_dicom_grid(phantom_dir):
    for scan, folder in phantom_dir.values():
        vol = dicom.read_series(os.path.join(folder, "dicom"))
        lab = labels.read_nifti_label(os.path.join(folder, "label.nii.gz"), vol.grid)
        np.testing.assert_array_equal(lab, scan.label)


def test_reoriented_nifti_is_accepted_without_resampling(phantom_dir, tmp_path):
    scan, folder = phantom_dir["cardiac"]
    img = nib.load(os.path.join(folder, "label.nii.gz"))
    # Another tool's axis order: (z, y, x) with z flipped; the affine follows the data, so no voxel moves.
    data = np.asarray(img.dataobj)
    flipped = np.flip(np.transpose(data, (2, 1, 0)), axis=0)
    n = data.shape[2]
    perm = np.array(
        [[0, 0, 1, 0], [0, 1, 0, 0], [-1, 0, 0, n - 1], [0, 0, 0, 1]], float
    )  # new idx -> old idx
    path = tmp_path / "reoriented.nii.gz"
    nib.save(nib.Nifti1Image(flipped, img.affine @ perm), path)
    vol = dicom.read_series(os.path.join(folder, "dicom"))
    np.testing.assert_array_equal(labels.read_nifti_label(str(path), vol.grid), scan.label)


def test_mismatched_nifti_is_refused_with_both_grids(phantom_dir, tmp_path):
    scan, folder = phantom_dir["cardiac"]
    vol = dicom.read_series(os.path.join(folder, "dicom"))
    img = nib.load(os.path.join(folder, "label.nii.gz"))
    shifted = img.affine.copy()
    shifted[2, 3] += 1.5  # half a slice
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), tmp_path / "shift.nii.gz")
    with pytest.raises(labels.LabelGridError, match="does not match the image grid") as e:
        labels.read_nifti_label(str(tmp_path / "shift.nii.gz"), vol.grid)
    assert "mask grid (shape" in e.value.reason and "image grid (shape" in e.value.reason
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), tmp_path / "short.nii.gz")
    with pytest.raises(labels.LabelGridError, match=str(tuple(scan.label.shape[::-1]))):
        labels.read_nifti_label(str(tmp_path / "short.nii.gz"), vol.grid)
    bad = np.asarray(img.dataobj).copy()
    bad[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(bad, img.affine), tmp_path / "values.nii.gz")
    with pytest.raises(labels.LabelError, match="outside 0..4"):
        labels.read_nifti_label(str(tmp_path / "values.nii.gz"), vol.grid)


def test_coca_xml_equals_nifti_labels(phantom_dir):
    for scan, folder in phantom_dir.values():
        vol = dicom.read_series(os.path.join(folder, "dicom"))
        lab = labels.read_coca_xml(os.path.join(folder, "calcium.xml"), vol.grid, vol.hu)
        np.testing.assert_array_equal(lab, scan.label)


def coca_with_quirks(src, dst, grid):
    """COCA quirks: an empty ROI, a second ROI on a slice, Point_mm missing (ImageIndex used)."""
    with open(src, "rb") as f:
        plist = plistlib.load(f)
    image = plist["Images"][0]
    image["ROIs"].append(
        {"Name": "Left Circumflex Artery", "NumberOfPoints": 0, "Point_px": [], "Point_mm": []}
    )
    extra = {
        "Name": "Right Coronary Artery",
        "NumberOfPoints": 4,
        "Point_px": ["(0.5, 0.5)", "(3.5, 0.5)", "(3.5, 2.5)", "(0.5, 2.5)"],  # pixels x 1..3, y 1..2
        "Area": 6 * grid.spacing[1] * grid.spacing[2] / 100.0,
    }
    image["ROIs"].append(extra)
    image["NumberOfROIs"] = len(image["ROIs"])
    with open(dst, "wb") as f:
        plistlib.dump(plist, f)
    return image["ImageIndex"]


def test_coca_quirks(phantom_dir, tmp_path):
    scan, folder = phantom_dir["chest"]
    vol = dicom.read_series(os.path.join(folder, "dicom"))
    k = coca_with_quirks(os.path.join(folder, "calcium.xml"), tmp_path / "q.xml", vol.grid)
    hu = vol.hu.copy()
    hu[k, 1:3, 1:4] = 300
    hu[k, 2, 3] = 100  # under 130 HU inside the ROI: dropped
    lab = labels.read_coca_xml(str(tmp_path / "q.xml"), vol.grid, hu)
    expected = scan.label.copy()
    expected[k, 1:3, 1:4] = 4
    expected[k, 2, 3] = 0
    np.testing.assert_array_equal(lab, expected)
    with open(tmp_path / "q.xml", "rb") as f:
        plist = plistlib.load(f)
    plist["Images"][0]["ROIs"][0]["Name"] = "Aortic Valve"
    with open(tmp_path / "bad.xml", "wb") as f:
        plistlib.dump(plist, f)
    with pytest.raises(labels.LabelError, match="Aortic Valve"):
        labels.read_coca_xml(str(tmp_path / "bad.xml"), vol.grid, hu)


def test_rasterise_polygon_uses_pixel_centres():
    square = np.array([[0.5, 0.5], [2.5, 0.5], [2.5, 2.5], [0.5, 2.5]])
    m = labels.rasterise_polygon(square, (4, 4))
    assert m.sum() == 4 and m[1:3, 1:3].all()
    triangle = np.array([[-0.5, -0.5], [4.2, -0.5], [-0.5, 4.2]])
    m = labels.rasterise_polygon(triangle, (5, 5))
    yy, xx = np.mgrid[:5, :5]
    np.testing.assert_array_equal(m, xx + yy <= 3)  # centres with x + y < 3.7


def record(label=True):
    rng = np.random.default_rng(0)
    return {
        "scan_id": "scan-0123456789abcdef",
        "slice_index": 7,
        "num_slices": 40,
        "image": rng.integers(-1024, 3000, size=(3, 16, 12)).astype(np.int16),
        "label": (rng.uniform(size=(16, 12)) < 0.1).astype(np.uint8) * 2 if label else None,
        "spacing": (3.0, 0.45, 0.45),
        "slice_thickness": 3.0,
        "protocol": "cardiac",
        "kvp": 120.0,
        "has_calcium": label,
    }


def test_record_round_trip():
    for with_label in (True, False):
        rec = record(with_label)
        out = records.decode(records.encode(rec))
        np.testing.assert_array_equal(out["image"], rec["image"])
        assert out["image"].dtype == np.int16
        if with_label:
            np.testing.assert_array_equal(out["label"], rec["label"])
        else:
            assert out["label"] is None
        for key in (
            "scan_id",
            "slice_index",
            "num_slices",
            "slice_thickness",
            "protocol",
            "kvp",
            "has_calcium",
        ):
            assert out[key] == rec[key]
        assert out["spacing"] == list(rec["spacing"]) and out["schema_version"] == records.SCHEMA_VERSION


def test_corrupt_records_are_refused_with_a_reason():
    data = records.encode(record())
    for damaged in (data[:-7], b"XXXX" + data[4:], data[:20], b"\x00" * 64):
        with pytest.raises(records.RecordError, match="not a readable calcjax record"):
            records.decode(damaged)
    with pytest.raises(records.RecordError, match="empty record"):
        records.decode(b"")


def test_encoding_gives_the_same_bytes_in_every_process():
    """tf.train.Example's feature map is written in hash order unless serialised deterministically: the
    same record must be the same bytes whatever PYTHONHASHSEED a build's worker process drew."""
    code = (
        "import hashlib, numpy as np\nfrom calcjax.io import records\n"
        "r = dict(scan_id='s', slice_index=1, num_slices=3, image=np.ones((3, 4, 4), np.int16),"
        " label=np.eye(4, dtype=np.uint8), spacing=(3, .5, .5), protocol='chest', kvp=120)\n"
        "print(hashlib.sha256(records.encode(r)).hexdigest())\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3, 4)
    }
    assert len(digests) == 1


def test_stack_indices_replicate_edges():
    assert records.stack_indices(0, 5, 1).tolist() == [0, 0, 1]
    assert records.stack_indices(4, 5, 2).tolist() == [2, 3, 4, 4, 4]


def test_decoding_needs_neither_jax_nor_tensorflow():
    code = (
        "import sys\nfrom calcjax.io import records\n"
        "print('jax' in sys.modules, 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_rasterise_polygon_equals_matplotlib_path_on_random_polygons():
    """Randomized equivalence with matplotlib's point-in-polygon: star-shaped and
    self-intersecting polygons with random real vertices (no pixel centre lies exactly on an edge)."""
    from matplotlib.path import Path

    rng = np.random.default_rng(18)
    shape = (40, 48)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    for trial in range(200):
        n = int(rng.integers(3, 14))
        if trial % 4 == 3:  # self-intersecting: random vertex order
            pts = rng.uniform([-5, -5], [shape[1] + 5, shape[0] + 5], size=(n, 2))
        else:  # star-shaped around a random centre, partly outside the image at times
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = rng.uniform(2.0, 25.0, n)
            c = rng.uniform([0, 0], [shape[1], shape[0]])
            pts = c + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
        ours = labels.rasterise_polygon(pts, shape)
        # even-odd, as ours: matplotlib's non-zero rule differs only for self-intersecting polygons
        path = Path(np.vstack([pts, pts[:1]]), closed=True)
        theirs = path.contains_points(centres).reshape(shape) if trial % 4 != 3 else None
        if theirs is None:
            theirs = _even_odd_reference(pts, centres).reshape(shape)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"trial {trial}")


def _even_odd_reference(pts, centres):
    """Even-odd rule from matplotlib: a point is inside when its winding parity is odd, computed by
    testing it against each of the polygon's triangles fanned from vertex 0 (parity of containment)."""
    from matplotlib.path import Path

    parity = np.zeros(len(centres), bool)
    for i in range(1, len(pts) - 1):
        tri = Path(np.array([pts[0], pts[i], pts[i + 1], pts[0]]), closed=True)
        parity ^= tri.contains_points(centres)
    return parity


def test_rasterise_polygon_top_left_rule_on_edges():
    square = np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]])
    m = labels.rasterise_polygon(square, (4, 4))
    expected = np.zeros((4, 4), bool)
    expected[0:2, 0:2] = True  # centres on the x=0 and y=0 edges in, on x=2 and y=2 out
    np.testing.assert_array_equal(m, expected)
    left = labels.rasterise_polygon(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 3.0], [0.0, 3.0]]), (4, 4))
    right = labels.rasterise_polygon(np.array([[1.0, 0.0], [3.0, 0.0], [3.0, 3.0], [1.0, 3.0]]), (4, 4))
    assert not (left & right).any() and (left | right)[0:3, 0:3].all()  # a shared edge is claimed once
