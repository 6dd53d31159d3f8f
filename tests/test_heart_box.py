"""The forward pass in the heart region's boxes (``calcjax.score.stages``,
``Predictor.predict_in_boxes``): one box per slab of slices, each window holding the slab's region with its
margin, aligned to the network's grid, of a few sizes only; labels placed back where they belong."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from calcjax.inference.heart_region import HeartRegion
from calcjax.inference.predictor import Predictor
from calcjax.io.preprocess import Window
from calcjax.model import network as model_lib
from calcjax.score import stages


def _blobs(z: int, size: int, data) -> np.ndarray:
    """A mask ``(z, size, size)`` of one to three random boxes (a region that is broad in some slices and
    narrow in others, with slices between them it misses)."""
    mask = np.zeros((z, size, size), bool)
    for _ in range(data.draw(st.integers(1, 3))):
        k0, y0, x0 = (data.draw(st.integers(0, n - 1)) for n in (z, size, size))
        k1, y1, x1 = (data.draw(st.integers(lo + 1, n)) for lo, n in ((k0, z), (y0, size), (x0, size)))
        mask[k0:k1, y0:y1, x0:x1] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from([96, 320, 512, 520]), z=st.integers(6, 40), slab=st.sampled_from([1, 4, 8]),
       data=st.data())  # fmt: skip
def test_the_boxes_hold_the_region_and_its_margin_on_the_networks_grid(size, z, slab, data):
    mask = _blobs(z, size, data)
    boxes = stages.heart_boxes(HeartRegion(mask, found=True), slab=slab, align=8)
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    assert boxes[0].k0 == zs[0] and boxes[-1].k1 == zs[-1] + 1
    covered = np.zeros(mask.shape, bool)
    for box, after in zip(boxes, boxes[1:] + [None], strict=True):
        assert 0 < box.k1 - box.k0 <= slab and (box.k0 - zs[0]) % slab == 0
        assert after is None or after.k0 >= box.k1  # no slice in two boxes
        covered[box.k0 : box.k1, box.y0 : box.y1, box.x0 : box.x1] = True
        in_plane = mask[box.k0 : box.k1].any(axis=0)
        ys, xs = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
        for lo, hi, b0, b1 in ((ys[0], ys[-1] + 1, box.y0, box.y1), (xs[0], xs[-1] + 1, box.x0, box.x1)):
            assert 0 <= b0 and b1 <= size
            assert b1 - b0 in stages.BOX_SIDES_PX or (b0, b1) == (0, size)  # a few shapes, or the slice
            if b1 - b0 < size:
                assert b0 % 8 == 0  # the network's downsampling grid of the whole slice
                assert lo - b0 >= stages.BOX_MARGIN_PX - 8 or b0 == 0
                assert b1 - hi >= stages.BOX_MARGIN_PX - 8 or b1 == size
    assert covered[mask].all()


def test_no_box_without_a_found_region():
    mask = np.ones((4, 64, 64), bool)
    assert stages.heart_boxes(None, 4, 8) is None
    assert stages.heart_boxes(HeartRegion(mask, found=False), 4, 8) is None
    assert stages.heart_boxes(HeartRegion(np.zeros_like(mask), found=True), 4, 8) is None


def test_labels_in_boxes_are_the_windows_own_with_the_whole_scans_neighbours_and_zero_elsewhere():
    """An untrained model that labels every voxel (probability bar 0): inside each box the labels are
    those of the network run on the window's column of the scan (its 2.5D neighbours from the whole
    scan), windows of any size padded to the network's multiple, zero outside the boxes."""
    cfg = model_lib.ModelConfig(
        num_classes=5, in_channels=3, stem_features=8, widths=(8, 16), block_layers=(1, 1), growth_rate=4,
        bottleneck_width=16, bottleneck_growth=4, dilations=(1, 2), decoder_layers=(1, 1), hu_min=-400.0,
        hu_max=1200.0, dtype="float32", pixel_mm=0.0,
    )  # fmt: skip
    predictor = Predictor(model_lib.new_model(cfg, 3), batch_size=2, min_calcium_probability=0.0)
    hu = np.random.default_rng(0).integers(-1000, 1500, (9, 60, 52)).astype(np.int16)
    boxes = [Window(0, 3, 8, 40, 0, 52), Window(4, 5, 0, 60, 16, 44), Window(6, 9, 24, 60, 8, 36)]
    out = predictor.predict_in_boxes(hu, boxes)
    inside = np.zeros(hu.shape, bool)
    for b in boxes:
        window = predictor.predict(hu[:, b.y0 : b.y1, b.x0 : b.x1])
        np.testing.assert_array_equal(out[b.k0 : b.k1, b.y0 : b.y1, b.x0 : b.x1], window[b.k0 : b.k1])
        inside[b.k0 : b.k1, b.y0 : b.y1, b.x0 : b.x1] = True
    assert out[inside].all() and not out[~inside].any()  # every voxel labelled inside, none outside
    whole = Window(0, 9, 0, 60, 0, 52)
    np.testing.assert_array_equal(predictor.predict_in_boxes(hu, [whole]), predictor.predict(hu))


def test_the_scorer_in_the_box_keeps_every_label_when_the_box_is_the_whole_slice(tmp_path):
    """64x64 phantoms: the box is the whole slice in-plane and the region's slices with their neighbours
    along z, so the labels are exactly the whole scan's; the setting is part of the run record."""
    import json
    import os

    from calcjax.score import cohort
    from calcjax.score.options import ScoreOptions
    from data_prep.phantom.generator import generate_scan, write_scan

    for i in range(2):
        write_scan(
            generate_scan(5, i, "chest", size=64, target_category=3), str(tmp_path / "in"), seed=5, index=i
        )
    salt = tmp_path / "salt.txt"
    salt.write_text("heart-box-test-salt-0123456789")
    rows = {}
    for box in (False, True):
        out = str(tmp_path / f"out-{box}")
        options = ScoreOptions(out=out, dicom_dir=str(tmp_path / "in"), salt_file=str(salt),
                               forward_in_heart_box=box, progress=False, num_bootstrap=10)  # fmt: skip
        cohort.score_cohort(options)
        rows[box] = [json.loads(line) for line in open(os.path.join(out, "scores.jsonl"))]
        assert json.load(open(os.path.join(out, "run.json"))).get("forward_in_heart_box", False) is box
    assert all(r["heart_region"] == "found" for r in rows[True])  # the box cut the slices outside it
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rows[False]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rows[True]]
