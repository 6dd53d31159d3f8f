"""Training checkpoints: the whole run for exact resume (``WORKDIR/checkpoints/<step>``), the best weights
by validation voxel F1 (``WORKDIR/best/<step>``), and params-only checkpoints of weights trained elsewhere.
The layout, sealing and reading for inference are ``calcjax.model.checkpoint``'s; this module adds what
only a trainer writes (the optax state, the counters, the grain iterator's position)."""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from calcjax.model.checkpoint import (
    BEST_METRIC,
    CheckpointError,
    holds_averages,
    seal_finished,
    verify,
)
from calcjax.train.step import TrainState, inference_weights


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

    def _seal(self) -> None:
        """Checksums every finished step folder (waits for a save in flight, as Orbax's next save would)."""
        for manager in (self.latest, self.best):
            manager.wait_until_finished()
            seal_finished(str(manager.directory))

    def save(self, state: TrainState, data_iter, config: dict) -> None:
        step = int(jax.device_get(state.step))
        self._seal()
        averages = {}
        if state.ema_params is not None:
            averages = dict(
                ema_params=ocp.args.StandardSave(state.ema_params),
                ema_batch_stats=ocp.args.StandardSave(state.ema_batch_stats),
            )
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
                **averages,
            ),
        )

    def save_best(self, state: TrainState, config: dict, metrics: dict) -> None:
        """``state``'s inference weights (the moving averages when it keeps them) with ``metrics``."""
        step = int(jax.device_get(state.step))
        self._seal()
        params, batch_stats = inference_weights(state)
        self.best.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                batch_stats=ocp.args.StandardSave(batch_stats),
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
        folder = os.path.join(str(self.latest.directory), str(step))
        verify(folder)
        abstract = ocp.utils.to_shape_dtype_struct
        counters = {"step": state.step, "skipped": state.skipped, "bad_in_a_row": state.bad_in_a_row}
        averages = {}
        held = holds_averages(folder)
        if held != (state.ema_params is not None):
            raise CheckpointError(
                f"{folder}: holds {'' if held else 'no '}moving averages, but this run's config "
                f"{'does not keep' if held else 'keeps'} them (train.ema_decay): resume with the ema_decay "
                "the run was started with"
            )
        if held:
            averages = dict(
                ema_params=ocp.args.StandardRestore(jax.tree.map(abstract, state.ema_params)),
                ema_batch_stats=ocp.args.StandardRestore(jax.tree.map(abstract, state.ema_batch_stats)),
            )
        out = self.latest.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(jax.tree.map(abstract, state.params)),
                batch_stats=ocp.args.StandardRestore(jax.tree.map(abstract, state.batch_stats)),
                opt_state=ocp.args.StandardRestore(jax.tree.map(abstract, state.opt_state)),
                counters=ocp.args.StandardRestore(jax.tree.map(abstract, counters)),
                data=grain.checkpoint.CheckpointRestore(data_iter),
                **averages,
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
            ema_params=out.get("ema_params"),
            ema_batch_stats=out.get("ema_batch_stats"),
        )

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        self._seal()
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
    seal_finished(os.path.abspath(root))
