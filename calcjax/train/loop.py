r"""Data-parallel training of DenseRAUnet on ArrayRecord shards.

  python -m calcjax.train --config configs/smoke.py --workdir RUN --config.data.shards=SHARDS \
      [--config.train.steps=600 ...]

One ``jax.jit`` train step over a ``('data',)`` mesh of every device (batch sharded, state replicated);
grain input with the iterator state in every checkpoint, so a run killed at any point and restarted with
the same workdir resumes exactly where its last checkpoint was (same parameters, same next batches).
A non-finite loss or gradient leaves the state unchanged, is reported, and after ``train.max_bad_steps``
in a row stops the run with a message; such a state is never saved. Validation every ``eval_every``
steps on the ``val`` split, whole scans: loss, voxel precision / recall / F1 and Agatston risk accuracy;
the best voxel F1 is kept in ``WORKDIR/best``. With ``train.ema_decay`` > 0 the run also keeps moving
averages of its weights (``calcjax.train.step``): they are what validation measures, what ``best`` keeps and
what a checkpoint is scored with; training itself goes on with the raw weights. Logs:
``WORKDIR/metrics.jsonl`` (one JSON line per log), TensorBoard events in ``WORKDIR/tb`` (tensorboardX),
``WORKDIR/config.json``, and a progress bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable

import grain
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from calcjax.core import cli, compile_cache, huge_pages, sharding
from calcjax.core import config as config_schema
from calcjax.data import input_pipeline
from calcjax.data import sources as sources_lib
from calcjax.inference import qrm_figures
from calcjax.model import checkpoint
from calcjax.model import network as model_lib
from calcjax.train import checkpoint as train_checkpoint
from calcjax.train import config as train_config
from calcjax.train import evaluation
from calcjax.train import step as ts


def _summary_writer(folder: str):
    """tensorboardX's ``SummaryWriter`` on ``folder``, imported without PyTorch: tensorboardX imports torch
    where it is installed (1-1.6 s on the 2-core development CPU, and PyTorch's libraries in every JAX
    trainer) only to accept torch tensors, and calcjax logs floats. While ``sys.modules["torch"]`` is None,
    ``import torch`` raises ImportError, which tensorboardX takes as "no PyTorch"."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter(folder)


class MetricWriter:
    """JSONL metrics (process 0) and TensorBoard events (tensorboardX, if importable)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.enabled:
            try:
                self.tb = _summary_writer(os.path.join(workdir, "tb"))
            except ImportError:  # pragma: no cover
                logging.warning("tensorboardX not installed: JSONL metrics only")

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def batch_fingerprint(batch: dict) -> str:
    """A short hash of a host batch (logged per step: proves the batch order after a resume)."""
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]


def _to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def initial_weights_from(path: str, mcfg: model_lib.ModelConfig, model: nnx.Module) -> nnx.Module:
    """``model`` with the parameters and BatchNorm statistics of a model file or checkpoint (``path``, as
    ``calcjax.score --checkpoint`` takes it) for fine-tuning; its architecture must be ``mcfg``'s (the
    compute dtype and the input pixel size may differ). A run that resumes from its own checkpoint does
    not come here."""
    config, loaded = checkpoint.load_for_inference(path, "best")
    if isinstance(loaded, model_lib.Ensemble):
        raise config_schema.ConfigError(
            f"train.init_from: {path} is an ensemble of {len(loaded.members)} models; "
            "fine-tune from one member"
        )
    theirs = model_lib.ModelConfig.from_saved(config["model"])
    theirs = dataclasses.replace(theirs, dtype=mcfg.dtype, pixel_mm=mcfg.pixel_mm)  # architecture only
    if theirs != mcfg:
        raise config_schema.ConfigError(
            f"train.init_from: {path} holds another architecture than config.model ({theirs} vs {mcfg})"
        )
    _, params, batch_stats = nnx.split(loaded, nnx.Param, nnx.BatchStat)
    nnx.update(model, params, batch_stats)
    logging.info("initial weights from %s", path)
    return model


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    transform_data: Callable[[grain.IterDataset], grain.IterDataset] | None = None,
) -> dict:
    """Trains per ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last metrics.

    ``config`` is checked first (``calcjax.train.config.check_config``: an unknown or missing key is an
    error naming it). ``transform_data``: applied to this process's training stream (batches of
    ``images`` / ``labels``) before it is iterated, e.g. a test's corrupt batches.
    """
    run = open_run(config, workdir, transform_data)
    last = {}
    show = jax.process_index() == 0
    with tqdm(total=run.tcfg.steps, initial=run.start, desc="train", unit="step", disable=not show) as bar:
        for step in range(run.start, run.tcfg.steps):
            train_one_step(run, step)
            bar.update()
            done = step + 1
            if done % run.tcfg.log_every == 0 or done == run.tcfg.steps:
                last = {**run.acc.line(int(run.state.skipped)), **_source_shares(run)}
                run.writer.write(done, last)
                bar.set_postfix(loss=f"{last['train_loss']:.4f}", steps_s=f"{last['steps_per_s']:.2f}")
            if done % run.tcfg.eval_every == 0 or done == run.tcfg.steps:
                last.update(validate(run, done))
            if done % run.tcfg.checkpoint_every == 0 or done == run.tcfg.steps:
                run.ckpt.save(run.state, run.data_iter, run.cfg_dict)
    run.ckpt.wait()
    run.ckpt.close()
    run.writer.close()
    return last


@dataclasses.dataclass
class Run:
    """One training run's open state: its config blocks, mesh, train state and step, data, checkpoints,
    validation sets and metric writer."""

    tcfg: ml_collections.ConfigDict
    cfg_dict: dict
    mesh: object
    state: ts.TrainState
    step_fn: Callable
    data_iter: object
    ckpt: train_checkpoint.Checkpointer
    best: float | None
    evaluator: evaluation.Evaluator
    splits: dict  # "val" / "real": input_pipeline.ShardSplit or None
    qrm_ref: qrm_figures.QrmReference | None
    writer: MetricWriter
    workdir: str
    start: int = 0
    acc: evaluation.TrainMetrics = dataclasses.field(default_factory=evaluation.TrainMetrics)
    source_names: tuple[str, ...] = ("main",)
    source_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1, np.int64))


def _checked(config: ml_collections.ConfigDict) -> None:
    train_config.check_config(config)
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise config_schema.ConfigError(
            f"train.ema_decay is {config.train.ema_decay}: it must be in [0, 1) (0 = no weight averaging)"
        )


def open_run(config, workdir: str, transform_data=None) -> Run:
    """Checks the config, writes it to the workdir, builds the model, optimizer, data stream, checkpoints
    (resuming from the latest) and validation sets."""
    _checked(config)
    sharding.initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    cfg_dict = _to_dict(config)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=1)
    logging.info("config:\n%s", config)
    mesh = sharding.make_mesh()
    graphdef, state, step_fn, pixel_mm = model_and_step(config, mesh)
    local_batch = sharding.local_batch_size(config.train.batch_size, mesh)
    data_iter = iter(train_stream(config, local_batch, pixel_mm, transform_data))
    ckpt = train_checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    if ckpt.latest_step() is not None:
        state = jax.device_put(ckpt.restore(state, data_iter), sharding.replicated(mesh))
        logging.info("resumed from step %d", int(state.step))
    loss_cfg = ts.LossConfig.from_config(config.loss)
    evaluator = evaluation.Evaluator(
        graphdef, config.train.batch_size, loss_cfg, state.params, state.batch_stats
    )
    splits, qrm_ref = _validation_sets(config.data)
    start = int(jax.device_get(state.step))
    names = tuple(s.name for s in sources_lib.parse_sources(config.data.sources, config.data.shards))
    return Run(config.train, cfg_dict, mesh, state, step_fn, data_iter, ckpt, ckpt.best_value(), evaluator,
               splits, qrm_ref, MetricWriter(workdir), workdir, start, source_names=names,
               source_counts=np.zeros(len(names), np.int64))  # fmt: skip


def model_and_step(config, mesh):
    """(graphdef, replicated train state, jitted train step, the model's input pixel size)."""
    tcfg = config.train
    mcfg = model_lib.ModelConfig.from_config(config.model)
    model = model_lib.new_model(mcfg, tcfg.seed)
    if tcfg.init_from:
        model = initial_weights_from(tcfg.init_from, mcfg, model)
    logging.info("DenseRAUnet: %d parameters", model_lib.parameter_count(model))
    tx = ts.make_optimizer(
        learning_rate=tcfg.learning_rate,
        warmup_steps=tcfg.warmup_steps,
        total_steps=tcfg.steps,
        weight_decay=tcfg.weight_decay,
        grad_clip=tcfg.grad_clip,
    )
    graphdef, state = ts.create_state(model, tx, ema=tcfg.ema_decay > 0)
    rep, dat = sharding.replicated(mesh), sharding.data_sharding(mesh)
    step_fn = ts.make_train_step(
        graphdef, tx, ts.LossConfig.from_config(config.loss), ema_decay=tcfg.ema_decay,
        in_shardings=(rep, dat, dat), out_shardings=(rep, rep),
    )  # fmt: skip
    return graphdef, jax.device_put(state, rep), step_fn, mcfg.pixel_mm


def train_stream(config, local_batch: int, pixel_mm: float, transform_data):
    """This process's grain stream of training batches over the run's sources (``calcjax.data.sources``,
    mixed by ``calcjax.data.input_pipeline.train_dataset``)."""
    dcfg = config.data
    data = input_pipeline.train_dataset(
        sources_lib.training_splits(sources_lib.parse_sources(dcfg.sources, dcfg.shards)),
        batch_size=local_batch,
        aug=input_pipeline.AugmentConfig.from_config(dcfg),
        calcium_fraction=dcfg.calcium_fraction,
        seed=dcfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=dcfg.worker_count,
        pixel_mm=pixel_mm,
    )
    return transform_data(data) if transform_data is not None else data


def _validation_sets(dcfg) -> tuple[dict, qrm_figures.QrmReference | None]:
    """The first source's val split (``val``: the checkpoint selector) and the watched figures' sets:
    each other source's val split (``val_<name>``), the real labelled scans (``real``) and the QRM insert
    scan; each is scored at every validation, and only ``val`` chooses the best checkpoint."""
    sources = sources_lib.parse_sources(dcfg.sources, dcfg.shards)
    splits = {}
    for k, source in enumerate(sources):
        name = "val" if k == 0 else f"val_{source.name}"
        try:
            splits[name] = input_pipeline.ShardSplit.load(source.folder, "val")
        except ValueError:
            splits[name] = None
            logging.warning("no val split in %s: no %s figures", source.folder, name)
    splits["real"] = None
    if dcfg.real_val_shards:
        splits["real"] = input_pipeline.ShardSplit.load(dcfg.real_val_shards, dcfg.real_val_split)
    qrm_ref = qrm_figures.QrmReference.load(dcfg.qrm_val_dicom) if dcfg.qrm_val_dicom else None
    return splits, qrm_ref


def train_one_step(run: Run, step: int) -> None:
    """One optimizer step on the next batch (a non-finite one is skipped, logged, and counted: too many in
    a row stop the run); the batch's fingerprint goes to ``batches.jsonl``."""
    batch = next(run.data_iter)
    if "source" in batch:  # a test's transform_data may hand over images and labels alone
        run.source_counts += np.bincount(np.asarray(batch["source"]), minlength=len(run.source_names))
    batch = {"images": batch["images"], "labels": batch["labels"]}
    fingerprint = batch_fingerprint(batch)
    g = sharding.to_global(batch, run.mesh)
    run.state, m = run.step_fn(run.state, g["images"], g["labels"])
    m = jax.device_get(m)
    if not m["finite"]:
        logging.warning("step %d: non-finite loss or gradient (%s); update skipped", step, m["loss"])
        run.writer.write(step + 1, {"skipped_step": True, "loss": float(m["loss"]), "batch": fingerprint})
        if int(run.state.bad_in_a_row) >= run.tcfg.max_bad_steps:
            raise RuntimeError(
                f"{run.tcfg.max_bad_steps} non-finite steps in a row (last at step {step}); stopping. "
                "Check the data (corrupt records, NaN HU) and the learning rate."
            )
    else:
        run.acc.add(m["loss"], m["tp"], m["fp"], m["fn"])
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, "batches.jsonl"), "a") as f:
            f.write(json.dumps({"step": step + 1, "batch": fingerprint}) + "\n")


def validate(run: Run, done: int) -> dict:
    """The validation figures after ``done`` steps, written and logged; the best checkpoint follows
    ``val_voxel_f1`` alone (the other sources', the real and the QRM figures are watched, never
    selectors; they keep predicted calcium in the heart region, as the scorer does)."""
    figures = {}
    if run.splits["val"] is not None:
        max_scans = 0 if done == run.tcfg.steps else run.tcfg.get("eval_max_scans", 0)
        val = run.evaluator.evaluate(run.state, run.splits["val"], max_scans)
        if val and (run.best is None or val["val_voxel_f1"] > run.best):
            run.best = val["val_voxel_f1"]
            run.ckpt.save_best(run.state, run.cfg_dict, {**val, "step": done})
        figures.update(_logged(run, done, val))
    for prefix, split in run.splits.items():
        if prefix != "val" and split is not None:
            watched = run.evaluator.evaluate(run.state, split, use_heart_region=True, prefix=prefix)
            figures.update(_logged(run, done, watched))
    if run.qrm_ref is not None:
        figures.update(_logged(run, done, run.evaluator.evaluate_qrm(run.state, run.qrm_ref)))
    return figures


def _source_shares(run: Run) -> dict:
    """``source_share_<name>``: each source's share of this process's training slices since the last log
    line (the counts start again after it); empty when no batch said its sources."""
    counts, total = run.source_counts.copy(), int(run.source_counts.sum())
    run.source_counts[:] = 0
    if not total:
        return {}
    names = run.source_names
    return {f"source_share_{n}": round(int(c) / total, 4) for n, c in zip(names, counts, strict=True)}


def _logged(run: Run, done: int, figures: dict) -> dict:
    if figures:
        run.writer.write(done, figures)
        logging.info("step %d: %s", done, figures)
    return figures


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so modules import side by side)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, config.")


def main(argv):
    del argv
    if flags.FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    compile_cache.enable()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def run() -> None:
    """The trainer's command line, which ``calcjax-train`` and ``python -m calcjax.train`` run
    (``calcjax.train.__main__``: they start again with huge pages before importing this module)."""
    huge_pages.reexec_with_huge_pages()  # a no-op there; a caller of this function directly starts again here
    cli.run_command("calcjax-train", "calcjax.train", __doc__, main, define_flags, required=["config"])


if __name__ == "__main__":
    run()
