"""One-file models: the shipped model loads and is checked; a damaged file is refused, never used."""

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

from calcjax import model as model_lib
from calcjax import model_file
from configs import shipped, smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_model():
    config = smoke.get_config().to_dict()
    return config, model_lib.DenseRAUnet(model_lib.ModelConfig.from_config(config["model"]), rngs=nnx.Rngs(5))


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
    for cfg in (stored, recipe):
        cfg["data"].pop("shards"), cfg["data"].pop("real_val_shards")
    # Data keys added after the model was trained (data.label_grow_px) are off in the recipe: 0 draws
    # nothing and changes nothing, so the recipe still trains what the model was trained with.
    for key in set(recipe["data"]) - set(stored["data"]):
        assert recipe["data"].pop(key) == 0, key
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
