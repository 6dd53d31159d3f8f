"""Where the training crops land: on calcium, on calcium-like bright objects (hard negatives), or anywhere."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from calcjax.data import input_pipeline as ip
from configs import default


def still(**kw) -> ip.AugmentConfig:
    """32x32 crops of the default config without rotation, zoom, noise or jitter (``kw`` overrides)."""
    base = ip.AugmentConfig.from_config(default.get_config().data)
    return dataclasses.replace(
        base, **{**dict(crop=32, rotate_deg=0.0, scale=0.0, noise_sd_hu=0.0, jitter=0.0), **kw}
    )


def slice_with(objects, calcium=None, size=256):
    """A soft-tissue (40 HU) 3-slice stack with 600 HU squares ``(y, x, half_width)`` and a calcium label."""
    hu = np.full((3, size, size), 40, np.int16)
    label = np.zeros((size, size), np.uint8)
    for y, x, r in objects:
        hu[:, y - r : y + r + 1, x - r : x + r + 1] = 600
    if calcium is not None:
        y, x = calcium
        hu[:, y - 1 : y + 2, x - 1 : x + 2] = 400
        label[y - 1 : y + 2, x - 1 : x + 2] = 2
    return hu, label


def crops(hu, label, cfg, n=200, seed=0):
    rng = np.random.default_rng(seed)
    return [ip.augment(hu, label, cfg, rng) for _ in range(n)]


def test_bright_crops_find_small_objects_as_often_as_large_ones():
    # A "spine" (41x41) and a "valve nodule" (3x3) far apart, no calcium on the slice.
    hu, label = slice_with([(200, 200, 20), (40, 40, 1)])
    got = crops(hu, label, still(bright_crop_probability=1.0))
    on_nodule = np.mean([(c["images"][..., 1] >= 130).sum() in range(1, 40) for c in got])
    on_spine = np.mean([(c["images"][..., 1] >= 130).sum() >= 40 for c in got])
    assert on_nodule + on_spine == 1.0  # every crop holds a bright object
    assert 0.35 < on_nodule < 0.65  # picked per object, not per voxel (per voxel: 9 / 1690 of crops)
    uniform = crops(hu, label, still(bright_crop_probability=0.0))
    assert np.mean([(c["images"][..., 1] >= 130).sum() in range(1, 40) for c in uniform]) < 0.1


def test_calcium_crops_still_come_first_and_calcium_is_not_a_bright_object():
    hu, label = slice_with([(200, 200, 20)], calcium=(60, 180))
    cfg = still(calcium_crop_probability=1.0, bright_crop_probability=1.0)
    assert all(c["labels"].any() for c in crops(hu, label, cfg, n=50))
    objects, n = ip.bright_objects(hu[1], label)
    assert n == 1 and objects[60, 180] == 0
    # Not centred on calcium: every crop goes to the spine, none to the calcium.
    cfg = still(calcium_crop_probability=0.0, bright_crop_probability=1.0)
    got = crops(hu, label, cfg, n=50)
    assert all((c["images"] >= 500).any() for c in got) and not any(c["labels"].any() for c in got)


def test_a_slice_without_bright_objects_falls_back_to_uniform_crops():
    """Channels 0 and 2 carry the x and y coordinates (all < 130 HU, so nothing is bright): each crop's
    mean reads back where it was centred. With bright crops asked for and none to find, the centres spread
    over the slice as uniform crops do."""
    size = 256
    yy, xx = np.mgrid[:size, :size]
    hu = np.stack([-700 + 2 * xx, np.full((size, size), 40), -700 + 2 * yy]).astype(np.int16)
    label = np.zeros((size, size), np.uint8)
    centres = {}
    for p in (1.0, 0.0):
        got = crops(hu, label, still(bright_crop_probability=p), n=400, seed=int(p))
        assert all(c["images"].shape == (32, 32, 3) and (c["images"] < 130).all() for c in got)
        centres[p] = np.array(
            [[(c["images"][..., 0].mean() + 700) / 2, (c["images"][..., 2].mean() + 700) / 2] for c in got]
        )
    lo, hi = 16, size - 16  # where a 32-pixel crop's centre can lie
    uniform_sd = (hi - lo) / np.sqrt(12)
    for p, c in centres.items():
        assert c.min() >= lo - 1 and c.max() <= hi + 1
        np.testing.assert_allclose(c.mean(axis=0), (lo + hi) / 2, atol=12, err_msg=f"p={p}")
        np.testing.assert_allclose(c.std(axis=0), uniform_sd, rtol=0.12, err_msg=f"p={p}")


def test_randomisation_blurs_offsets_and_correlates_noise():
    """data.blur_px / hu_offset / noise_correlation_px: each does what it says on a crop."""
    hu, label = slice_with([(128, 128, 20)], calcium=(100, 100))
    plain = still(calcium_crop_probability=1.0)

    def sharpest(cfg):  # mean over crops of the largest step between neighbouring pixels (HU)
        return np.mean(
            [np.abs(np.diff(c["images"][..., 1], axis=1)).max() for c in crops(hu, label, cfg, n=20)]
        )

    assert sharpest(still(calcium_crop_probability=1.0, blur_px=2.0)) < 0.8 * sharpest(plain)
    shifted = crops(hu, label, still(calcium_crop_probability=1.0, hu_offset=20.0), n=40)
    corner = np.array([c["images"][0, 0, 1] for c in shifted])  # soft tissue, 40 HU before the offset
    assert corner.min() >= 20.0 and corner.max() <= 60.0 and corner.std() > 5.0
    same_crop = crops(hu, label, still(calcium_crop_probability=1.0, hu_offset=20.0), n=1)[0]
    np.testing.assert_array_equal(same_crop["labels"], crops(hu, label, plain, n=1)[0]["labels"])

    flat = np.full((3, 256, 256), 40, np.int16)
    empty = np.zeros((256, 256), np.uint8)

    def lag1(cfg):
        img = crops(flat, empty, cfg, n=10)
        return np.mean(
            [np.corrcoef(c["images"][:, :-1, 0].ravel(), c["images"][:, 1:, 0].ravel())[0, 1] for c in img]
        )

    white = lag1(still(noise_sd_hu=20.0))
    textured = lag1(still(noise_sd_hu=20.0, noise_correlation_px=3.0))
    assert abs(white) < 0.1 and textured > 0.3, (white, textured)


def test_label_grow_px_follows_the_blurred_crops_edge_and_draws_nothing():
    """With blur, the crop's >= 130 HU footprint of a bright lesion is larger than its warped label: with
    data.label_grow_px the labels are that footprint; the images are the same crops either way."""
    hu = np.full((3, 128, 128), 40, np.int16)
    label = np.zeros((128, 128), np.uint8)
    hu[:, 62:67, 62:67] = 900
    label[62:67, 62:67] = 2
    plain = crops(hu, label, still(calcium_crop_probability=1.0, blur_px=2.0), n=10)
    grown = crops(hu, label, still(calcium_crop_probability=1.0, blur_px=2.0, label_grow_px=6), n=10)
    wider = 0
    for a, b in zip(plain, grown, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
        bright = a["images"][..., 1] >= 130
        np.testing.assert_array_equal(b["labels"] > 0, bright)  # one blob: its whole footprint
        wider += int(b["labels"].astype(bool).sum() > a["labels"].astype(bool).sum())
    assert wider >= 5  # blurred (sigma up to 2 px) crops' footprints outgrow the label


def test_soften_fat_around_calcium_raises_only_the_fat_within_the_radius():
    """Fat within the radius of the label becomes soft tissue, with a one-pixel ramp; lung, soft tissue
    and the calcium keep their HU."""
    img = np.full((40, 40, 3), -100.0, np.float32)
    img[:, :5] = -850.0  # lung
    img[30:, :] = 40.0  # soft tissue
    img[18:21, 18:21] = 600.0
    label = np.zeros((40, 40), np.uint8)
    label[18:21, 18:21] = 2
    out = ip.soften_fat_around_calcium(img, label, radius_px=4.0, shift_hu=130.0)
    np.testing.assert_array_equal(out[18:21, 18:21], 600.0)
    np.testing.assert_allclose(out[18:21, 21:25], 30.0)  # 1-4 px from the label: fully soft
    np.testing.assert_allclose(out[19, 25], -100.0)  # 5 px: the ramp's end, weight 0
    np.testing.assert_allclose(out[19, 26:], -100.0)
    changed = out != img
    assert changed.all(axis=2).sum() == changed.any(axis=2).sum()  # every channel alike
    np.testing.assert_array_equal(out[:, :5], img[:, :5])
    np.testing.assert_array_equal(out[30:], img[30:])
    ramp = ip.soften_fat_around_calcium(img, label, radius_px=3.5, shift_hu=130.0)
    np.testing.assert_allclose(ramp[19, 24], -100.0 + 130.0 * 0.5)  # 4 px at radius 3.5: half way


def test_lesion_soft_tissue_surrounds_calcium_crops_with_soft_tissue_and_keeps_labels():
    """data.lesion_soft_tissue_mm: with probability 1 every calcium crop's fat near the lesion
    reads soft tissue, further fat stays fat; labels are the same crops' labels without it; off (0 mm)
    draws nothing, so the stream is the one the keys' absence gives; the crop's pixel size is required."""
    hu = np.full((3, 128, 128), -100, np.int16)
    label = np.zeros((128, 128), np.uint8)
    hu[:, 62:66, 62:66] = 600
    label[62:66, 62:66] = 2
    plain = still(crop=48, calcium_crop_probability=1.0)
    soft = dataclasses.replace(plain, lesion_soft_tissue_mm=6.0, lesion_soft_tissue_probability=1.0)
    off = dataclasses.replace(plain, lesion_soft_tissue_probability=1.0)  # 0 mm: off
    radii = []
    for seed in range(20):  # each crop from its own seed: the same crop window with and without
        a, b, c = (ip.augment(hu, label, k, np.random.default_rng(seed), 1, 0.5) for k in (plain, soft, off))
        np.testing.assert_array_equal(a["images"], c["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        raised = (b["images"][..., 1] > -30) & (b["labels"] == 0)
        dist_mm = 0.5 * ndimage.distance_transform_edt(b["labels"] == 0)
        assert not raised[dist_mm > 6.5].any()  # never beyond 6 mm and the ramp's pixel
        radii.append(dist_mm[raised].max() if raised.any() else 0.0)
    assert np.ptp(radii) > 2.0 and max(radii) > 4.0  # the radius is drawn per crop, up to 6 mm
    with pytest.raises(ValueError, match="crop_pixel_mm"):
        ip.augment(hu, label, soft, np.random.default_rng(0))


def test_lesion_soft_tissue_bright_surrounds_unlabelled_bright_objects_too():
    """data.lesion_soft_tissue_bright=1: a bright unlabelled object (here a 600 HU nodule in fat, no
    calcium on the slice) gets the same soft-tissue surround; with 0 only calcium does."""
    hu = np.full((3, 128, 128), -100, np.int16)
    hu[:, 62:66, 62:66] = 600
    label = np.zeros((128, 128), np.uint8)
    base = still(crop=48, bright_crop_probability=1.0, lesion_soft_tissue_mm=6.0)
    calcium_only = dataclasses.replace(base, lesion_soft_tissue_probability=1.0)
    every_bright = dataclasses.replace(calcium_only, lesion_soft_tissue_bright=1)
    extra = []
    for seed in range(8):
        a, b = (
            ip.augment(hu, label, k, np.random.default_rng(seed), 1, 0.5)
            for k in (calcium_only, every_bright)
        )
        assert (a["images"] >= 130).any() and not a["labels"].any()
        soft = [((x["images"][..., 1] > -30) & (x["images"][..., 1] < 130)) for x in (a, b)]
        # without: only the nodule's interpolated edge (one pixel wide) lies between fat and calcium
        assert soft[0].sum() <= 24 and (soft[0] <= soft[1]).all()
        dist_mm = 0.5 * ndimage.distance_transform_edt(b["images"][..., 1] < 130)
        assert not soft[1][dist_mm > 6.5].any()  # never beyond 6 mm and the ramp's pixel
        extra.append(int(soft[1].sum() - soft[0].sum()))
    assert max(extra) > 100  # a drawn radius of a few mm rings the nodule with soft tissue
