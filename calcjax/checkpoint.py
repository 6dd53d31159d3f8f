"""Orbax checkpoints: the whole run for exact resume, the best parameters for scoring.

``WORKDIR/checkpoints/<step>/`` (``max_to_keep`` latest, saved asynchronously) holds the items ``params``,
``batch_stats``, ``opt_state``, ``counters`` (step, skipped steps), ``data`` (the grain iterator's position,
through ``grain.checkpoint``) and ``config`` (the resolved config, JSON). ``WORKDIR/best/<step>/`` holds
``params``, ``batch_stats``, ``config`` and ``metrics`` of the best validation voxel F1 so far.
Restores go against abstract targets (``ocp.utils.to_shape_dtype_struct``), so optax states come back as
their own types. ``load_for_inference`` needs nothing but a checkpoint folder: the model config is read
from the checkpoint itself.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from calcjax import model as model_lib
from calcjax import model_file
from calcjax.train_step import TrainState

STATE_ITEMS = ("params", "batch_stats", "opt_state", "counters")


class CheckpointError(ValueError):
    """A checkpoint that must not be used, naming the folder and the reason."""


BEST_METRIC = "val_voxel_f1"


class Checkpointer:
    """The latest-N manager and the best-by-validation-F1 manager of one workdir."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.latest = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )
        self.best = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "best")),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: m[BEST_METRIC],
                best_mode="max",
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, state: TrainState, data_iter, config: dict) -> None:
        step = int(jax.device_get(state.step))
        self.latest.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                batch_stats=ocp.args.StandardSave(state.batch_stats),
                opt_state=ocp.args.StandardSave(state.opt_state),
                counters=ocp.args.StandardSave(
                    {"step": state.step, "skipped": state.skipped, "bad_in_a_row": state.bad_in_a_row}
                ),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(config),
            ),
        )

    def save_best(self, state: TrainState, config: dict, metrics: dict) -> None:
        step = int(jax.device_get(state.step))
        self.best.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                batch_stats=ocp.args.StandardSave(state.batch_stats),
                config=ocp.args.JsonSave(config),
                metrics=ocp.args.JsonSave(metrics),
            ),
            metrics={BEST_METRIC: float(metrics[BEST_METRIC])},
        )

    def best_value(self) -> float | None:
        step = self.best.best_step()
        if step is None:
            return None
        metrics = self.best.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))["metrics"]
        return float(metrics[BEST_METRIC])

    def restore(self, state: TrainState, data_iter) -> TrainState:
        """Restores the latest checkpoint into (a state shaped like) ``state`` and the data iterator."""
        step = self.latest.latest_step()
        abstract = ocp.utils.to_shape_dtype_struct
        counters = {"step": state.step, "skipped": state.skipped, "bad_in_a_row": state.bad_in_a_row}
        out = self.latest.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(jax.tree.map(abstract, state.params)),
                batch_stats=ocp.args.StandardRestore(jax.tree.map(abstract, state.batch_stats)),
                opt_state=ocp.args.StandardRestore(jax.tree.map(abstract, state.opt_state)),
                counters=ocp.args.StandardRestore(jax.tree.map(abstract, counters)),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        c = out["counters"]
        return TrainState(
            step=c["step"],
            params=out["params"],
            batch_stats=out["batch_stats"],
            opt_state=out["opt_state"],
            skipped=c["skipped"],
            bad_in_a_row=c["bad_in_a_row"],
        )

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def save_for_inference(root: str, state: TrainState, config: dict) -> None:
    """A params-only checkpoint ``root/<step>`` (params, batch_stats, config) that ``load_for_inference``
    reads; for weights trained elsewhere (the PyTorch baseline), which have no optimizer or data state."""
    manager = ocp.CheckpointManager(
        os.path.abspath(root),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
    )
    manager.save(
        int(jax.device_get(state.step)),
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            batch_stats=ocp.args.StandardSave(state.batch_stats),
            config=ocp.args.JsonSave(config),
        ),
    )
    manager.wait_until_finished()
    manager.close()


def resolve(path: str, which: str = "best") -> str:
    """A checkpoint step folder from a workdir (``which`` = best / latest) or from a step folder itself."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        return path
    sub = {"best": "best", "latest": "checkpoints"}[which]
    root = os.path.join(path, sub)
    steps = (
        sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True) if os.path.isdir(root) else []
    )
    if not steps:
        if which == "best":
            return resolve(path, "latest")
        raise FileNotFoundError(f"no checkpoint under {path} (looked for best/<step> and checkpoints/<step>)")
    return os.path.join(root, str(steps[0]))


def load_for_inference(path: str | None, which: str = "best"):
    """(config dict, eval-mode model) from a workdir, a step folder or a one-file model
    (``calcjax.model_file``, digest checked); ``None`` is the shipped model. The config is the checkpoint's
    own."""
    if path is None:
        path = model_file.DEFAULT_MODEL
    if os.path.isfile(path):
        config, model, _ = model_file.load(path)
        return config, model
    folder = resolve(path, which)
    with open(os.path.join(folder, "config", "metadata")) as f:
        config = json.load(f)
    mcfg = model_lib.ModelConfig.from_config(config["model"])
    model = model_lib.DenseRAUnet(mcfg, rngs=nnx.Rngs(0))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    ckptr = ocp.StandardCheckpointer()
    abstract = ocp.utils.to_shape_dtype_struct
    params = ckptr.restore(os.path.join(folder, "params"), jax.tree.map(abstract, params))
    batch_stats = ckptr.restore(os.path.join(folder, "batch_stats"), jax.tree.map(abstract, batch_stats))
    for name, tree in (("params", params), ("batch_stats", batch_stats)):
        bad = model_file.count_non_finite(tree)
        if bad:
            raise CheckpointError(
                f"{folder}: {bad} non-finite values in {name}: the checkpoint is damaged (a flipped byte "
                "or a diverged run); it would score every scan as no calcium"
            )
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    return config, model
