"""Training: data parallelism, exact resume after SIGKILL, non-finite steps, checkpoints for scoring."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from xla_env import xla_flags

from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of 8 small phantom scans (64x64) with train and val splits."""
    base = tmp_path_factory.mktemp("train_data")
    for i in range(8):
        write_scan(
            generate_scan(5, i, "cardiac", size=64, target_category=(i % 4) + 1),
            str(base / "in"),
            seed=5,
            index=i,
        )
    out = str(base / "shards")
    m = builder.build(
        builder.BuildOptions(
            str(base / "in"), out, split="train=0.75,val=0.25", salt="train-test-salt-0", progress=False
        )
    )
    assert m["splits"]["train"]["num_records"] and m["splits"]["val"]["num_records"]
    return out


def small_config(shards, **train):
    from configs import smoke

    c = smoke.get_config()
    c.data.shards = shards
    c.data.crop = 32
    c.train.update(
        dict(batch_size=4, steps=12, checkpoint_every=4, eval_every=1000, eval_max_scans=1, log_every=2)
    )
    c.train.update(train)
    return c


def nan_at_steps(steps: set[int]):
    """A ``transform_data`` for ``train.train_and_evaluate``: the batches of ``steps`` (0-based, counted
    from the run's start) get a NaN pixel, as a corrupt record would give them."""

    def transform(ds):
        drawn = itertools.count()

        def poison(batch):
            if next(drawn) in steps:
                batch = {**batch, "images": batch["images"].copy()}
                batch["images"][0, 0, 0, 0] = np.nan
            return batch

        return ds.map(poison)

    return transform


def cli_args(shards, workdir, **train):
    args = [
        sys.executable,
        "-m",
        "calcjax.train",
        "--config",
        os.path.join(ROOT, "configs", "smoke.py"),
        "--workdir",
        str(workdir),
        f"--config.data.shards={shards}",
        "--config.data.crop=32",
    ]
    defaults = dict(
        batch_size=4, steps=12, checkpoint_every=4, eval_every=1000, eval_max_scans=1, log_every=2
    )
    for k, v in {**defaults, **train}.items():
        args.append(f"--config.train.{k}={v}")
    return args


def final_params(workdir):
    from calcjax.model import checkpoint

    _, model = checkpoint.load_for_inference(str(workdir), "latest")
    from flax import nnx

    return {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def batches(workdir):
    with open(os.path.join(workdir, "batches.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_exact_resume_after_sigkill(shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    ref = tmp_path / "ref"
    subprocess.run(cli_args(shards, ref), check=True, capture_output=True, env=env, cwd=ROOT)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        cli_args(shards, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "4").is_dir() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(batches(run))
    assert 4 <= killed_at < 12
    subprocess.run(cli_args(shards, run), check=True, capture_output=True, env=env, cwd=ROOT)
    a, b = final_params(ref), final_params(run)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    resumed = batches(run)[killed_at:]
    assert [r["step"] for r in resumed] == list(range(5, 13))  # restarted from the step-4 checkpoint
    assert resumed == batches(ref)[4:]


def test_nan_batch_is_skipped_reported_and_never_saved(shards, tmp_path):
    from calcjax.train import loop as train

    c = small_config(shards, steps=6)
    last = train.train_and_evaluate(c, str(tmp_path / "run"), transform_data=nan_at_steps({2}))
    assert last["skipped_steps"] == 1
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(r.get("skipped_step") and r["step"] == 3 for r in rows)
    params = final_params(tmp_path / "run")
    assert all(np.isfinite(v).all() for v in params.values())


def test_init_from_starts_the_run_from_a_model_files_weights(shards, tmp_path):
    from flax import nnx

    from calcjax.core import config as config_schema
    from calcjax.model import files as model_file
    from calcjax.model import network as model_lib
    from calcjax.train import loop as train

    _, shipped, _ = model_file.load(model_file.DEFAULT_MODEL)
    want = nnx.to_flat_state(nnx.state(shipped, nnx.Param))
    c = small_config(shards, steps=2, checkpoint_every=2, learning_rate=0.0)  # no update: params stay
    c.train.init_from = model_file.DEFAULT_MODEL
    train.train_and_evaluate(c, str(tmp_path / "run"))
    got = final_params(tmp_path / "run")
    assert len(got) == len(want)
    for path, value in want:
        np.testing.assert_array_equal(got[str(path)], np.asarray(value.get_value()), err_msg=str(path))
    # Another architecture is refused, naming the option.
    c.model.growth_rate = 4
    other = model_lib.ModelConfig.from_config(c.model)
    fresh = model_lib.new_model(other, 0)
    with pytest.raises(config_schema.ConfigError, match="train.init_from: .* another architecture"):
        train.initial_weights_from(model_file.DEFAULT_MODEL, other, fresh)


def test_a_pixel_size_model_trains_validates_and_loads_with_its_pixel_size(shards, tmp_path):
    """model.pixel_mm through the trainer: crops and validation on the model's pixels (the phantoms here
    have about 3.5 mm pixels: 64 px over a 200-250 mm FOV; the model reads 2 mm), labels back on the
    scans' grid."""
    from calcjax.model import checkpoint
    from calcjax.train import loop as train

    c = small_config(shards, steps=2, checkpoint_every=2, eval_every=2)
    c.model.pixel_mm = 2.0
    last = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert 0.0 <= last["val_voxel_f1"] <= 1.0 and np.isfinite(last["val_loss"])
    config, model = checkpoint.load_for_inference(str(tmp_path / "run"), "best")
    assert config["model"]["pixel_mm"] == 2.0 and model.cfg.pixel_mm == 2.0


def test_too_many_bad_steps_stop_the_run(shards, tmp_path):
    from calcjax.train import loop as train

    c = small_config(shards, steps=8, max_bad_steps=2)
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
        train.train_and_evaluate(c, str(tmp_path / "run"), transform_data=nan_at_steps({1, 2, 3}))


def test_best_checkpoint_loads_for_inference_without_a_config_file(shards, tmp_path):
    from calcjax.model import checkpoint
    from calcjax.train import loop as train

    c = small_config(shards, steps=4, eval_every=4)
    last = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert "val_voxel_f1" in last and 0.0 <= last["val_voxel_f1"] <= 1.0
    os.remove(tmp_path / "run" / "config.json")
    config, model = checkpoint.load_for_inference(str(tmp_path / "run"), "best")
    assert config["model"]["widths"] == [16, 32, 64]
    import jax.numpy as jnp

    assert model(jnp.zeros((1, 32, 32, 3))).shape == (1, 32, 32, 5)
    assert (tmp_path / "run" / "tb").is_dir()


def test_best_checkpoint_holds_the_params_of_the_best_step_and_a_worse_one_keeps_it(
    shards, tmp_path, monkeypatch
):
    """The contract, not just "something loads": validation F1 scripted per step (0.5, 0.7, 0.2, 0.6 at
    steps 2-8); the best checkpoint is step 4's, with exactly the parameters trained at step 4, and the
    later, worse validations neither replace it nor are saved."""
    import jax
    from flax import nnx

    from calcjax.model import checkpoint
    from calcjax.train import checkpoint as train_checkpoint
    from calcjax.train import evaluation
    from calcjax.train import loop as train

    scripted = {2: 0.5, 4: 0.7, 6: 0.2, 8: 0.6}
    seen_steps = []

    def fake_evaluate(self, state, split, max_scans=0):
        step = int(jax.device_get(state.step))
        seen_steps.append(step)
        return {"val_voxel_f1": scripted[step], "val_loss": 1.0}

    saved = {}
    real_save_best = train_checkpoint.Checkpointer.save_best

    def recording_save_best(self, state, config, metrics):
        saved[int(jax.device_get(state.step))] = [np.asarray(x) for x in jax.tree.leaves(state.params)]
        return real_save_best(self, state, config, metrics)

    monkeypatch.setattr(evaluation.Evaluator, "evaluate", fake_evaluate)
    monkeypatch.setattr(train_checkpoint.Checkpointer, "save_best", recording_save_best)
    c = small_config(shards, steps=8, eval_every=2, checkpoint_every=2)
    train.train_and_evaluate(c, str(tmp_path / "run"))
    assert seen_steps == [2, 4, 6, 8] and sorted(saved) == [2, 4]
    assert checkpoint.resolve(str(tmp_path / "run"), "best").endswith(os.path.join("best", "4"))
    _, model = checkpoint.load_for_inference(str(tmp_path / "run"), "best")
    loaded = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert len(loaded) == len(saved[4])
    for got, want in zip(loaded, saved[4], strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(x, y) for x, y in zip(saved[2], saved[4], strict=True))  # it trained on


def test_the_real_sample_figure_is_logged_at_each_validation_and_never_selects(shards, tmp_path, monkeypatch):
    """data.real_val_shards: at each validation the real folder is evaluated too, with the heart region, and
    logged as real_*; the best checkpoint still follows val_voxel_f1 alone (here the real figure peaks at
    step 6, where validation is worst)."""
    import jax

    from calcjax.model import checkpoint
    from calcjax.train import evaluation
    from calcjax.train import loop as train

    val_f1 = {2: 0.5, 4: 0.7, 6: 0.2, 8: 0.6}
    real_f1 = {2: 0.1, 4: 0.2, 6: 0.9, 8: 0.3}
    calls = []

    def fake_evaluate(self, state, split, max_scans=0, *, use_heart_region=False, prefix="val"):
        step = int(jax.device_get(state.step))
        calls.append((step, prefix, use_heart_region, split.folder))
        f1 = (real_f1 if prefix == "real" else val_f1)[step]
        return {f"{prefix}_voxel_f1": f1, f"{prefix}_loss": 1.0}

    monkeypatch.setattr(evaluation.Evaluator, "evaluate", fake_evaluate)
    real = str(tmp_path / "real")
    shutil.copytree(shards, real)  # a stand-in folder: the real sample is not in the repository
    c = small_config(shards, steps=8, eval_every=2, checkpoint_every=2)
    c.data.real_val_shards, c.data.real_val_split = real, "val"
    last = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert [(s, p, r) for s, p, r, _ in calls if p == "real"] == [(s, "real", True) for s in (2, 4, 6, 8)]
    assert all(folder == real for _, p, _, folder in calls if p == "real")
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["real_voxel_f1"] for r in logged if "real_voxel_f1" in r] == [0.1, 0.2, 0.9, 0.3]
    assert last["real_voxel_f1"] == 0.3 and last["val_voxel_f1"] == 0.6
    assert checkpoint.resolve(str(tmp_path / "run"), "best").endswith(os.path.join("best", "4"))


def test_the_qrm_figure_is_logged_at_each_validation_and_never_selects(shards, tmp_path, monkeypatch):
    """data.qrm_val_dicom: at each validation the model's calcjax.research.qrm_check figures on the insert
    scan are
    logged as qrm_* (a synthetic insert of the QRM layout stands in for the real Canon scan here); the
    best checkpoint still follows val_voxel_f1 alone."""
    from test_qrm_check import qrm_layout_volume

    from calcjax.inference import qrm_figures
    from calcjax.model import checkpoint
    from calcjax.train import loop as train

    loaded = []

    def fake_load(folder):
        loaded.append(folder)
        return qrm_figures.QrmReference.from_volume(*qrm_layout_volume())

    monkeypatch.setattr(qrm_figures.QrmReference, "load", staticmethod(fake_load))
    c = small_config(shards, steps=4, eval_every=2, checkpoint_every=2)
    c.data.qrm_val_dicom = "qrm-folder"
    last = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert loaded == ["qrm-folder"]  # read once, before training
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    qrm_lines = [r for r in logged if "qrm_calcium_probability" in r]
    assert [r["step"] for r in qrm_lines] == [2, 4]
    for r in qrm_lines:
        assert 0.0 <= r["qrm_calcium_probability"] <= 1.0 and 0.0 <= r["qrm_voxel_recall"] <= 1.0
        assert r["qrm_agatston_reference"] > 0 and r["qrm_fp_voxels_outside"] >= 0
    assert last["qrm_agatston_reference"] == qrm_lines[-1]["qrm_agatston_reference"]
    best = max((r for r in logged if "val_voxel_f1" in r), key=lambda r: r["val_voxel_f1"])
    assert checkpoint.resolve(str(tmp_path / "run"), "best").endswith(os.path.join("best", str(best["step"])))


def test_a_missing_real_folder_stops_the_run_before_training(shards, tmp_path):
    from calcjax.io import shards as shard_folder
    from calcjax.train import loop as train

    c = small_config(shards)
    c.data.real_val_shards = str(tmp_path / "nowhere")
    with pytest.raises(shard_folder.NotAShardFolderError, match="nowhere has no manifest.json"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


EIGHT_DEVICES = textwrap.dedent(
    """
    import json, numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    from calcjax.model import network as M
    from calcjax.train import step as ts
    from calcjax.core import sharding
    from configs import smoke
    assert jax.device_count() == 8
    c = smoke.get_config()
    c.loss.update(dict(rho=0.1, k_min=16))
    rng = np.random.default_rng(0)
    images = rng.normal(40, 300, size=(8, 32, 32, 3)).astype(np.float32)
    labels = (rng.uniform(size=(8, 32, 32)) < 0.05).astype(np.int32) * rng.integers(1, 5, size=(8, 32, 32))
    out = {}
    for n in (1, 8):
        model = M.new_model(M.ModelConfig.from_config(c.model), 0)
        tx = ts.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, weight_decay=1e-4,
                               grad_clip=1.0)
        graphdef, state = ts.create_state(model, tx)
        mesh = sharding.make_mesh(jax.devices()[:n])
        rep, dat = sharding.replicated(mesh), sharding.data_sharding(mesh)
        state = jax.device_put(state, rep)
        step = ts.make_train_step(graphdef, tx, ts.LossConfig.from_config(c.loss),
                                  in_shardings=(rep, dat, dat), out_shardings=(rep, rep))
        g = sharding.to_global({"images": images, "labels": labels}, mesh)
        state, m = step(state, g["images"], g["labels"])
        leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats))]
        out[n] = (float(m["loss"]), leaves, len(g["images"].sharding.device_set))
    diffs = [float(np.abs(a - b).max()) for a, b in zip(out[1][1], out[8][1])]
    print(json.dumps({"loss1": out[1][0], "loss8": out[8][0], "max_param_diff": max(diffs),
                      "devices": [out[1][2], out[8][2]]}))
    """
)


@pytest.mark.slow
def test_one_step_on_8_devices_equals_1_device():
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices=8), "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == [1, 8]
    assert r["loss8"] == pytest.approx(r["loss1"], rel=1e-6)
    assert r["max_param_diff"] <= 1e-5


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.array(x) for x in jax.tree.leaves(tree)]


def test_the_moving_average_follows_its_formula_and_a_skipped_step_leaves_it():
    """train.ema_decay in the train step: after each finite step the averages of the parameters and of the
    BatchNorm statistics move to ``(1 - r) * average + r * new`` with ``r = 1 - min(decay, (1 + s) /
    (10 + s))`` (s = the step's 0-based index: both branches of the min are taken here); a non-finite step
    leaves weights and averages as they were; scoring reads the averages."""
    import jax.numpy as jnp

    from calcjax.model import network as M
    from calcjax.train import step as ts
    from configs import smoke

    c = smoke.get_config()
    c.loss.update(dict(rho=0.1, k_min=16))
    rng = np.random.default_rng(0)
    images = rng.normal(40, 300, size=(4, 32, 32, 3)).astype(np.float32)
    labels = (rng.uniform(size=(4, 32, 32)) < 0.05).astype(np.int32) * rng.integers(1, 5, size=(4, 32, 32))
    model = M.new_model(M.ModelConfig.from_config(c.model), 0)
    tx = ts.make_optimizer(
        learning_rate=1e-2, warmup_steps=1, total_steps=10, weight_decay=1e-4, grad_clip=1.0
    )
    _, plain = ts.create_state(model, tx)
    assert plain.ema_params is None and ts.inference_weights(plain)[0] is plain.params
    graphdef, state = ts.create_state(model, tx, ema=True)
    decay = 0.15  # the warm-up (1 + s) / (10 + s) is 0.1 at s = 0, then above 0.15
    step = ts.make_train_step(graphdef, tx, ts.LossConfig.from_config(c.loss), ema_decay=decay)
    want = _leaves((state.params, state.batch_stats))
    np.testing.assert_array_equal(
        np.concatenate([x.ravel() for x in want]),
        np.concatenate([x.ravel() for x in _leaves((state.ema_params, state.ema_batch_stats))]),
    )
    for s in range(3):
        state, m = step(state, jnp.asarray(images), jnp.asarray(labels))
        assert bool(m["finite"])
        r = 1.0 - min(decay, (1 + s) / (10 + s))
        new = _leaves((state.params, state.batch_stats))
        want = [(1 - r) * a + r * b for a, b in zip(want, new, strict=True)]
        got = _leaves((state.ema_params, state.ema_batch_stats))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(g, n) for g, n in zip(got, new, strict=True))  # an average, not a copy
    assert ts.inference_weights(state)[0] is state.ema_params
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    before = _leaves((state.params, state.ema_params, state.ema_batch_stats))
    state, m = step(state, jnp.asarray(bad), jnp.asarray(labels))
    assert not bool(m["finite"])
    for a, b in zip(before, _leaves((state.params, state.ema_params, state.ema_batch_stats)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_an_ema_decay_outside_0_to_1_is_refused_before_the_run_starts(shards, tmp_path, decay):
    from calcjax.core import config as config_schema
    from calcjax.train import loop as train

    with pytest.raises(config_schema.ConfigError, match=r"train.ema_decay is .*\[0, 1\)"):
        train.train_and_evaluate(small_config(shards, ema_decay=decay), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_averaging_run_validates_keeps_scores_and_resumes_its_averages(shards, tmp_path, monkeypatch):
    """A run with train.ema_decay: each validation measures the averages (not the raw weights), the best
    checkpoint and a step folder load as the averages, and a run that stops after its step-2 checkpoint
    resumes to the same averages and weights as one that never stopped; resuming with averaging switched
    off is refused, naming the folder."""
    import orbax.checkpoint as ocp

    from calcjax.inference import predictor as inference
    from calcjax.model import checkpoint
    from calcjax.train import loop as train

    measured = []
    real_set_weights = inference.Predictor.set_weights

    def recording_set_weights(self, params, batch_stats):
        measured.append(_leaves(params))
        return real_set_weights(self, params, batch_stats)

    monkeypatch.setattr(inference.Predictor, "set_weights", recording_set_weights)
    c = small_config(shards, steps=4, checkpoint_every=2, eval_every=2, ema_decay=0.9)
    ref = tmp_path / "ref"
    train.train_and_evaluate(c, str(ref))
    monkeypatch.setattr(inference.Predictor, "set_weights", real_set_weights)

    def item(run, step, name):
        return _leaves(ocp.StandardCheckpointer().restore(str(run / "checkpoints" / str(step) / name)))

    def scored(path):
        from flax import nnx

        return _leaves(nnx.state(checkpoint.load_for_inference(str(path))[1], nnx.Param))

    assert len(measured) == 2  # validations at steps 2 and 4
    for got, s in zip(measured, (2, 4), strict=True):
        ema, raw = item(ref, s, "ema_params"), item(ref, s, "params")
        assert all(np.array_equal(a, b) for a, b in zip(got, ema, strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(got, raw, strict=True))
    best = int(os.path.basename(checkpoint.resolve(str(ref), "best")))
    want = item(ref, best, "ema_params")  # the best folder and the step folder both score as the averages
    for path in (ref, ref / "checkpoints" / str(best)):
        assert all(np.array_equal(a, b) for a, b in zip(scored(path), want, strict=True)) and want

    run = tmp_path / "stopped"

    def stop_at_the_fourth_batch(ds):
        drawn = itertools.count()

        def stop(batch):
            if next(drawn) == 3:
                raise RuntimeError("stopped")
            return batch

        return ds.map(stop)

    with pytest.raises(Exception, match="stopped"):
        train.train_and_evaluate(c, str(run), transform_data=stop_at_the_fourth_batch)
    deadline = time.time() + 60  # the step-2 save is asynchronous
    while time.time() < deadline and not (run / "checkpoints" / "2" / "ema_params").is_dir():
        time.sleep(0.1)
    off = small_config(shards, steps=4, checkpoint_every=2, eval_every=2, ema_decay=0.0)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints.2: holds moving averages"):
        train.train_and_evaluate(off, str(run))
    train.train_and_evaluate(c, str(run))
    # Steps 1-3 before the stop; then from the step-2 checkpoint: 3 again, and 4.
    assert [r["step"] for r in batches(run)] == [1, 2, 3, 3, 4]
    for name in ("ema_params", "ema_batch_stats", "params"):
        for a, b in zip(item(run, 4, name), item(ref, 4, name), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_two_sources_are_mixed_by_weight_logged_and_each_validated(shards, tmp_path):
    """data.sources: grain mixes the sources' streams in the weights' proportions (the tags count them),
    the log carries each source's share, and each source with a val split gets its own figures, while the
    best checkpoint follows the first source's val_voxel_f1."""
    from calcjax.data import input_pipeline as ip
    from calcjax.data import sources
    from calcjax.train import loop as train

    spec = f"phantom:{shards}:3,again:{shards}:1"
    pairs = sources.training_splits(sources.parse_sources(spec, ""))
    aug = ip.AugmentConfig.from_config(small_config(shards).data)
    it = iter(ip.train_dataset(pairs, batch_size=8, aug=aug, calcium_fraction=0.3, seed=0))
    tags = np.concatenate([next(it)["source"] for _ in range(25)])
    assert set(np.unique(tags)) == {0, 1} and abs(np.mean(tags == 0) - 0.75) <= 0.02
    c = small_config(shards, steps=4, eval_every=4, log_every=4)
    c.data.sources = spec
    last = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert last["source_share_phantom"] + last["source_share_again"] == pytest.approx(1.0)
    assert abs(last["source_share_phantom"] - 0.75) <= 0.15  # 16 slices of this process
    assert "val_voxel_f1" in last and "val_again_voxel_f1" in last
    with open(tmp_path / "run" / "best" / "4" / "metrics" / "metrics") as f:
        assert "val_again_voxel_f1" not in json.load(f)  # the first source alone chooses


def test_the_trainers_tensorboard_events_are_written_without_importing_torch(tmp_path):
    """tensorboardX imports PyTorch where it can; the JAX trainer's writer keeps it out (1-1.6 s a start)."""
    code = (
        "import sys; from calcjax.train.loop import MetricWriter; w = MetricWriter(sys.argv[1]); "
        "w.write(1, {'loss': 0.5}); w.close(); print('torch' in sys.modules); import torch"
    )
    run = subprocess.run([sys.executable, "-c", code, tmp_path], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]  # and PyTorch imports as usual afterwards
    assert run.stdout.split() == ["False"]
    events = os.listdir(tmp_path / "tb")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    assert os.path.getsize(tmp_path / "tb" / events[0]) > 40  # more than the file header: the scalar
    assert json.loads(open(tmp_path / "metrics.jsonl").read()) == {"step": 1, "loss": 0.5}
