"""Input at a fixed physical pixel size (``model.pixel_mm``): resampling, crops, prediction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from calcjax.data import input_pipeline
from calcjax.io import pixel_size


def disc(n: int, spacing_mm: float, diameter_mm: float, value: int = 400) -> np.ndarray:
    """An ``(n, n)`` int16 slice: air, with a disc of ``diameter_mm`` at the centre (pixel ``spacing_mm``)."""
    c = (np.arange(n) - (n - 1) / 2) * spacing_mm
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return np.where(r2 <= (diameter_mm / 2) ** 2, value, -1000).astype(np.int16)


def test_resampling_keeps_the_field_of_view_and_makes_an_object_the_same_size():
    fine = disc(200, 0.4, 8.0)[None]  # 80 mm FOV, 0.4 mm pixels (gated)
    coarse = disc(110, 0.75, 8.0)[None]  # 82.5 mm FOV, 0.75 mm pixels (chest)
    a = pixel_size.to_model_grid(fine, (3.0, 0.4, 0.4), 0.5)
    b = pixel_size.to_model_grid(coarse, (3.0, 0.75, 0.75), 0.5)
    assert a.shape == (1, 160, 160) and b.shape == (1, 165, 165) and a.dtype == np.int16
    area_a, area_b = (a >= 130).sum(), (b >= 130).sum()
    want = np.pi * (8.0 / 2 / 0.5) ** 2  # 201 pixels of 0.5 mm
    assert abs(area_a - want) / want < 0.08 and abs(area_b - want) / want < 0.08, (area_a, area_b)
    # Native, the two discs differ by the square of the pixel ratio: what pixel_mm is for.
    assert (coarse >= 130).sum() * 3 < (fine >= 130).sum()
    # pixel_mm 0 or an equal grid returns the input itself.
    assert pixel_size.to_model_grid(fine, (3.0, 0.4, 0.4), 0.0) is fine
    assert pixel_size.to_model_grid(fine, (3.0, 0.5, 0.5), 0.5) is fine


def test_labels_go_to_the_model_grid_and_back_onto_the_scan():
    lab = (disc(200, 0.4, 6.0) > 0).astype(np.uint8)[None] * 2
    small = pixel_size.labels_to_model_grid(lab, (3.0, 0.4, 0.4), 0.5)
    assert small.shape == (1, 160, 160) and set(np.unique(small)) == {0, 2}
    back = pixel_size.labels_to_native(small, (200, 200))
    assert back.shape == lab.shape and back.dtype == np.uint8
    inter, union = ((back > 0) & (lab > 0)).sum(), ((back > 0) | (lab > 0)).sum()
    assert inter / union > 0.9


def test_training_crops_show_an_object_at_the_model_pixel_size():
    cfg = input_pipeline.AugmentConfig(
        crop=96, rotate_deg=0.0, scale=0.0, noise_sd_hu=0.0, jitter=0.0,
        calcium_crop_probability=1.0, bright_crop_probability=0.0, blur_px=0.0, hu_offset=0.0,
        noise_correlation_px=0.0,
        label_grow_px=0, lesion_soft_tissue_mm=0.0, lesion_soft_tissue_probability=0.0,
        lesion_soft_tissue_bright=0,
    )  # fmt: skip
    areas = {}
    for spacing, n in ((0.4, 160), (0.75, 86)):
        img = np.repeat(disc(n, spacing, 8.0)[None], 3, axis=0)
        lab = (img[1] > 0).astype(np.uint8)
        for pixel_mm in (0.0, 0.5):
            rec = {"image": img, "label": lab, "spacing": [3.0, spacing, spacing]}
            out = input_pipeline.Augment(cfg, pixel_mm).random_map(rec, np.random.default_rng(0))
            areas[spacing, pixel_mm] = int((out["labels"] > 0).sum())
            assert out["images"].shape == (96, 96, 3)
    want = np.pi * 8.0**2  # the 8 mm disc in 0.5 mm pixels: 201
    assert all(abs(areas[s, 0.5] - want) / want < 0.1 for s in (0.4, 0.75)), areas
    assert areas[0.4, 0.0] > 3 * areas[0.75, 0.0], areas


@pytest.fixture(scope="module")
def smoke_models():
    """A smoke-sized model reading 0.5 mm pixels and the same weights reading native pixels."""

    from calcjax.model import network as model_lib
    from configs import smoke

    cfg = model_lib.ModelConfig.from_config(smoke.get_config().model)
    at_half = model_lib.new_model(dataclasses.replace(cfg, pixel_mm=0.5), 3)
    native = model_lib.new_model(cfg, 3)
    return at_half, native


def test_a_pixel_size_model_predicts_on_its_grid_and_answers_on_the_scans(smoke_models):
    from calcjax.inference import predictor as inference

    at_half, native = smoke_models
    rng = np.random.default_rng(0)
    hu = rng.integers(-200, 600, size=(3, 70, 70)).astype(np.int16)
    spacing = (3.0, 0.7, 0.7)
    p_half = inference.Predictor(at_half, batch_size=2, loss_kwargs=dict(rho=1.0, k_min=1, lam=1.0))
    p_native = inference.Predictor(native, batch_size=2)
    got = p_half.predict(hu, spacing)
    assert got.shape == hu.shape and got.dtype == np.uint8
    want = pixel_size.labels_to_native(p_native.predict(pixel_size.to_model_grid(hu, spacing, 0.5)), (70, 70))
    np.testing.assert_array_equal(got, want)
    # Validation: the same labels, and a loss taken on the model's (98 x 98, padded to 104) grid.
    labels = np.zeros(hu.shape, np.uint8)
    labels[:, 30:36, 30:36] = 2
    again, loss = p_half.predict_with_loss(hu, labels, spacing)
    np.testing.assert_array_equal(again, got)
    assert np.isfinite(loss) and loss > 0
    with pytest.raises(ValueError, match="0.5 mm pixels: predict needs the scan's spacing"):
        p_half.predict(hu)


def test_saved_configs_before_pixel_mm_are_native_models_and_the_twin_refuses_it(tmp_path):
    from calcjax.core import config as config_schema
    from calcjax.model import files as model_file
    from calcjax.model import network as model_lib
    from calcjax.research.torch_baseline import train as torch_train
    from configs import smoke

    config, _, _ = model_file.load(model_file.DEFAULT_MODEL)
    assert config["model"]["pixel_mm"] == 0.0  # the shipped model reads native pixels
    saved_before = {k: v for k, v in config["model"].items() if k != "pixel_mm"}  # a file older than the key
    assert model_lib.ModelConfig.from_saved(saved_before).pixel_mm == 0.0
    block = dict(smoke.get_config().model)
    del block["pixel_mm"]
    with pytest.raises(config_schema.ConfigError, match="lacks pixel_mm"):
        model_lib.ModelConfig.from_config(block)  # a training config must say it
    c = smoke.get_config()
    c.model.pixel_mm = 0.5
    with pytest.raises(config_schema.ConfigError, match="model.pixel_mm"):
        torch_train.train_and_evaluate(c, str(tmp_path / "run"))
