"""One-file models: the shipped model loads and is checked; a damaged file is refused, never used; an
ensemble file is exported from its members and predicts their mean probabilities."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from calcjax.core import config as config_schema
from calcjax.inference import predictor as inference
from calcjax.model import export as model_export
from calcjax.model import files as model_file
from calcjax.model import network as model_lib
from calcjax.train import loop as train
from configs import shipped, smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_model():
    config = smoke.get_config().to_dict()
    return config, model_lib.new_model(model_lib.ModelConfig.from_config(config["model"]), 5)


def test_save_then_load_gives_the_same_parameters_and_statistics(tmp_path):
    config, model = _small_model()
    path = str(tmp_path / "m.msgpack")
    digest = model_file.save(path, config, model)
    assert open(path + ".sha256").read().split()[0] == digest == model_file.sha256_of(path)
    loaded_config, loaded, got = model_file.load(path)
    assert got == digest and loaded_config == json.loads(json.dumps(config))
    for kind in (nnx.Param, nnx.BatchStat):
        want = jax.tree.leaves(nnx.state(model, kind).to_pure_dict())
        have = jax.tree.leaves(nnx.state(loaded, kind).to_pure_dict())
        assert len(want) == len(have) > 0
        for a, b in zip(want, have, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    norms = [m for _, m in nnx.iter_graph(loaded) if isinstance(m, nnx.BatchNorm)]
    assert norms and all(m.use_running_average for m in norms)  # loaded in eval mode


def test_a_flipped_byte_or_a_missing_digest_is_refused(tmp_path):
    config, model = _small_model()
    path = str(tmp_path / "m.msgpack")
    model_file.save(path, config, model)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(model_file.ModelFileError, match="does not match"):
        model_file.load(path)
    os.remove(path + ".sha256")
    with pytest.raises(model_file.ModelFileError, match="no m.msgpack.sha256"):
        model_file.load(path)


def test_non_finite_parameters_are_refused_even_with_a_matching_digest(tmp_path, poison_first_param):
    config, model = _small_model()
    poison_first_param(model)
    path = str(tmp_path / "nan.msgpack")
    model_file.save(path, config, model)
    with pytest.raises(model_file.ModelFileError, match="non-finite values in params"):
        model_file.load(path)


def test_the_shipped_model_loads_and_matches_its_digest():
    assert os.path.isfile(model_file.DEFAULT_MODEL), "the shipped model is part of the repository"
    config, model, digest = model_file.load(model_file.DEFAULT_MODEL)
    assert digest == model_file.expected_sha256(model_file.DEFAULT_MODEL)
    assert os.path.getsize(model_file.DEFAULT_MODEL) < 8e6
    card = open(os.path.join(model_file.MODELS_DIR, "README.md")).read()
    assert digest in card  # the model card names the file it describes


def test_configs_shipped_is_the_shipped_models_recipe():
    """``configs/shipped.py`` gives the config stored in the shipped model, but for where its shards were."""
    stored, _, _ = model_file.load(model_file.DEFAULT_MODEL)
    recipe = json.loads(shipped.get_config().to_json())
    for cfg in (stored, recipe):  # where the shards and the watched real scans were, not what trained it
        cfg["data"].pop("shards"), cfg["data"].pop("real_val_shards"), cfg["data"].pop("real_val_split")
    # Keys added after the model was trained (data.label_grow_px, data.qrm_val_dicom, train.ema_decay) are
    # off in the recipe: 0 or "" draws, logs and averages nothing, so the recipe still trains what the model
    # was trained with.
    for block in ("data", "train"):
        for key in set(recipe[block]) - set(stored[block]):
            assert recipe[block].pop(key) in (0, ""), f"{block}.{key}"
    assert stored == recipe
    assert stored["data"]["blur_px"] == 1.5 and stored["train"]["steps"] == 1600


def _score_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "calcjax.score", *args], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.slow
def test_score_cli_without_checkpoint_uses_the_shipped_model(tmp_path):
    from data_prep.phantom.generator import generate_scan, write_scan

    scan = generate_scan(17, 0, "cardiac", size=64, target_category=2)
    write_scan(scan, str(tmp_path / "in"), seed=17, index=0)
    out = str(tmp_path / "out")
    p = _score_cli("--dicom", str(tmp_path / "in"), "--out", out, "--num_bootstrap", "20")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "scored 1 scans" in p.stdout
    report = open(os.path.join(out, "report.md")).read()
    assert f"sha256 {model_file.sha256_of(model_file.DEFAULT_MODEL)}" in report
    # A damaged model file is refused by the same command, with the reason and no traceback.
    broken = tmp_path / "broken.msgpack"
    shutil.copy(model_file.DEFAULT_MODEL, broken)
    shutil.copy(model_file.DEFAULT_MODEL + ".sha256", str(broken) + ".sha256")
    with open(broken, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    p = _score_cli(
        "--dicom", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--checkpoint", str(broken)
    )
    assert p.returncode == 2 and "does not match" in p.stderr and "Traceback" not in p.stderr


def _member(seed: int):
    config = smoke.get_config().to_dict()
    config["train"]["seed"] = seed
    return config, model_lib.new_model(model_lib.ModelConfig.from_config(config["model"]), seed)


def _hu_batch(shape=(2, 16, 16, 3), seed=0):
    return np.random.default_rng(seed).uniform(-300, 900, shape).astype(np.float32)


def test_an_ensemble_predicts_its_members_mean_probabilities():
    members = [_member(s)[1] for s in (1, 2, 3)]
    for m in members:
        m.eval()
    ens = model_lib.Ensemble(members)
    x = _hu_batch()
    member_p = [np.asarray(jax.nn.softmax(m(x), axis=-1)) for m in members]
    mean = sum(member_p) / 3
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(ens(x), axis=-1)), mean, rtol=1e-5, atol=1e-6)
    assert not np.allclose(member_p[0], member_p[1], atol=1e-3)  # the members differ: the mean is a test
    want = np.where(mean[..., 0] < 0.5, mean[..., 1:].argmax(-1) + 1, 0)
    np.testing.assert_array_equal(np.asarray(model_lib.labels_from_logits(ens(x))), want)
    alone = model_lib.Ensemble(members[:1])
    np.testing.assert_array_equal(
        np.asarray(model_lib.labels_from_logits(alone(x))),
        np.asarray(model_lib.labels_from_logits(members[0](x))),
    )
    config = smoke.get_config().to_dict()
    config["model"]["growth_rate"] = 4
    other = model_lib.new_model(model_lib.ModelConfig.from_config(config["model"]), 0)
    with pytest.raises(ValueError, match="differ in architecture"):
        model_lib.Ensemble([members[0], other])


def test_an_ensemble_model_file_is_exported_from_its_members_and_scores_as_one_model(tmp_path):
    paths = []
    for seed in (1, 2):
        config, model = _member(seed)
        paths.append(str(tmp_path / f"m{seed}.msgpack"))
        model_file.save(paths[-1], config, model)
    out = str(tmp_path / "ens.msgpack")
    digest = model_export.export(paths, "best", out)
    config, loaded, got = model_file.load(out)
    assert got == digest and isinstance(loaded, model_lib.Ensemble) and len(loaded.members) == 2
    assert config["ensemble"]["members"] == 2
    assert [c["train"]["seed"] for c in config["ensemble"]["member_configs"]] == [1, 2]
    members = [model_file.load(p)[1] for p in paths]
    x = _hu_batch()
    want = np.asarray(model_lib.Ensemble(members)(x))
    np.testing.assert_allclose(np.asarray(loaded(x)), want, rtol=1e-5, atol=1e-5)
    # The scorer's predictor reads it like any model: whole-volume labels from the mean probabilities.
    hu = _hu_batch((4, 16, 16), seed=3).astype(np.int16)
    labels = inference.Predictor(loaded, batch_size=2).predict(hu)
    stacks = np.stack([hu[[max(k - 1, 0), k, min(k + 1, 3)]].transpose(1, 2, 0) for k in range(4)])
    np.testing.assert_array_equal(labels, np.asarray(model_lib.labels_from_logits(loaded(stacks))))
    with pytest.raises(config_schema.ConfigError, match="ensemble of 2 models"):
        train.initial_weights_from(out, members[0].cfg, _member(3)[1])
    with pytest.raises(model_file.ModelFileError, match="single models"):
        model_export.export([out, paths[0]], "best", str(tmp_path / "nested.msgpack"))
    with pytest.raises(model_file.ModelFileError, match="ensemble block"):
        model_file.save(str(tmp_path / "bad.msgpack"), _member(1)[0], loaded)
