"""The forward pass in the heart region's box (``calcjax.score.stages``): a box that holds the region with
its margin, aligned to the network's grid, of a few sizes only, and labels placed back where they belong."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from calcjax.inference.heart_region import HeartRegion
from calcjax.score import stages


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([96, 320, 512, 520]),
    z=st.integers(6, 40),
    data=st.data(),
)
def test_the_box_holds_the_region_and_its_margin_on_the_networks_grid(size, z, data):
    y0 = data.draw(st.integers(0, size - 1))
    y1 = data.draw(st.integers(y0 + 1, size))
    x0 = data.draw(st.integers(0, size - 1))
    x1 = data.draw(st.integers(x0 + 1, size))
    k0 = data.draw(st.integers(0, z - 1))
    k1 = data.draw(st.integers(k0 + 1, z))
    mask = np.zeros((z, size, size), bool)
    mask[k0:k1, y0:y1, x0:x1] = True
    box = stages.heart_box(HeartRegion(mask, found=True), context=1, align=8)
    assert (box.k0, box.k1) == (k0, k1) and (box.z0, box.z1) == (max(0, k0 - 1), min(z, k1 + 1))
    for lo, hi, b0, b1 in ((y0, y1, box.y0, box.y1), (x0, x1, box.x0, box.x1)):
        assert b0 <= lo and hi <= b1 and 0 <= b0 and b1 <= size
        assert b1 - b0 in (*stages.BOX_SIDES_PX, size) or b1 == size  # a few shapes, or the slice
        if b1 - b0 < size:
            assert b0 % 8 == 0  # the network's downsampling grid of the whole slice
            assert lo - b0 >= stages.BOX_MARGIN_PX - 8 or b0 == 0
            assert b1 - hi >= stages.BOX_MARGIN_PX - 8 or b1 == size


def test_no_box_without_a_found_region():
    mask = np.ones((4, 64, 64), bool)
    assert stages.heart_box(None, 1, 8) is None
    assert stages.heart_box(HeartRegion(mask, found=False), 1, 8) is None
    assert stages.heart_box(HeartRegion(np.zeros_like(mask), found=True), 1, 8) is None


def test_labels_of_the_box_land_in_place_and_zero_elsewhere():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, (20, 512, 512)).astype(np.int16)
    mask = np.zeros(hu.shape, bool)
    mask[5:12, 200:300, 150:260] = True
    box = stages.heart_box(HeartRegion(mask, found=True), context=1, align=8)
    assert box.y1 - box.y0 == box.x1 - box.x0 == 256

    def predict(crop, spacing):  # labels = a function of the voxel's own HU, so placement is checked
        return (crop > 1000).astype(np.uint8)

    out = stages.forward_in_box(predict, hu, (3.0, 0.7, 0.7), box)
    inside = np.zeros(hu.shape, bool)
    inside[box.k0 : box.k1, box.y0 : box.y1, box.x0 : box.x1] = True
    np.testing.assert_array_equal(out[inside], (hu > 1000)[inside])
    assert not out[~inside].any()


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
