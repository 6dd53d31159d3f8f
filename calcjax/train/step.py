"""The train state and the jitted train / eval steps (functional: NNX graphdef + state pytrees).

``TrainState`` holds the step, the parameters, the BatchNorm statistics, the optax state and the count of
skipped steps, and, when ``train.ema_decay`` > 0, an exponential moving average of the parameters and of the
BatchNorm statistics (Polyak averaging, :func:`ema_rate`): the weights a run validates, keeps as best and
scores with (:func:`inference_weights`), while training goes on with the raw ones. ``train_step`` computes the
bootstrap-IoU loss and its gradient, applies AdamW (via the ``optax`` transformation given), and *keeps the
old state* when the loss or the gradient norm is not finite: a NaN or inf never reaches the parameters or a
checkpoint; the step is counted in ``skipped`` / ``bad_in_a_row`` and reported in the metrics. Under
``jax.jit`` with the batch sharded on a ``('data',)`` mesh and the state replicated, BatchNorm statistics and
the loss are those of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from calcjax.core import compile_cache
from calcjax.core import config as config_schema
from calcjax.model import losses
from calcjax.model import network as model_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    skipped: jax.Array
    bad_in_a_row: jax.Array
    # The moving averages (same trees as params / batch_stats); None when train.ema_decay is 0.
    ema_params: nnx.State | None = None
    ema_batch_stats: nnx.State | None = None


def inference_weights(state: TrainState) -> tuple[nnx.State, nnx.State]:
    """(params, batch_stats) a run validates and scores with: the moving averages when it keeps them."""
    if state.ema_params is not None:
        return state.ema_params, state.ema_batch_stats
    return state.params, state.batch_stats


def ema_rate(step: jax.Array, decay: float) -> jax.Array:
    """The weight of the new value in the moving average after the update of (0-based) ``step``:
    ``1 - min(decay, (1 + step) / (10 + step))``, so the first updates follow the raw weights closely and the
    average reaches its full horizon of about ``1 / (1 - decay)`` steps only later (the warm-up of
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``)."""
    step = jnp.asarray(step, jnp.float32)
    return 1.0 - jnp.minimum(decay, (1.0 + step) / (10.0 + step))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The bootstrap-IoU loss's settings (``calcjax.model.losses``); the values live in ``config.loss``."""

    rho: float
    k_min: int
    lam: float
    smooth: float
    iou_classes: str  # see calcjax.model.losses

    def kwargs(self, **overrides) -> dict:
        """The keyword arguments of ``losses.bootstrap_iou_loss`` (and its PyTorch twin), with overrides."""
        return {**dataclasses.asdict(self), **overrides}

    @classmethod
    def from_config(cls, cfg) -> LossConfig:
        """From a config's ``loss`` block (``calcjax.core.config.fields_of``: every field, no other key)."""
        return cls(**config_schema.fields_of(cls, cfg, "loss"))


def create_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, ema: bool = False
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits ``model`` (put in train mode) into a graphdef and a fresh :class:`TrainState`; ``ema``: the
    state keeps moving averages too, starting from copies of the initial weights."""
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    # One compiled program rather than one per array shape (optax's zeros, the copies): see
    # calcjax.model.network.new_model. The copies are the state's own buffers (the train step donates it).
    fresh = functools.partial(_fresh_state, tx, ema)
    return graphdef, jax.jit(fresh, compiler_options=compile_cache.one_off_options())(params, batch_stats)


def _fresh_state(tx: optax.GradientTransformation, ema: bool, params: nnx.State, batch_stats: nnx.State):
    """The :class:`TrainState` at step 0 of ``params`` and ``batch_stats`` (copies; jitted by
    :func:`create_state`)."""
    copy = functools.partial(jax.tree.map, jnp.copy)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=copy(params),
        batch_stats=copy(batch_stats),
        opt_state=tx.init(params),
        skipped=jnp.zeros((), jnp.int32),
        bad_in_a_row=jnp.zeros((), jnp.int32),
        ema_params=copy(params) if ema else None,
        ema_batch_stats=copy(batch_stats) if ema else None,
    )


def voxel_counts(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Calcium (label > 0) voxel TP / FP / FN of the predicted labels, summed over the batch."""
    pred = model_lib.labels_from_logits(logits) > 0
    ref = labels > 0
    return {
        "tp": jnp.sum(pred & ref, dtype=jnp.int32),
        "fp": jnp.sum(pred & ~ref, dtype=jnp.int32),
        "fn": jnp.sum(~pred & ref, dtype=jnp.int32),
    }


def loss_and_grads(
    graphdef: nnx.GraphDef,
    loss_cfg: LossConfig,
    params: nnx.State,
    batch_stats: nnx.State,
    images: jax.Array,
    labels: jax.Array,
) -> tuple[jax.Array, nnx.State, jax.Array, nnx.State]:
    """The train-mode forward pass on ``images`` ``(B, H, W, C)`` HU against ``labels`` ``(B, H, W)``:
    (bootstrap-IoU loss, BatchNorm statistics updated with the batch's, logits ``(B, H, W, classes)``, the
    loss's gradient with respect to ``params``)."""

    def loss_fn(p):
        model = nnx.merge(graphdef, p, batch_stats, copy=True)
        logits = model(images)
        loss = losses.bootstrap_iou_loss(logits, labels, **loss_cfg.kwargs())
        return loss, (nnx.state(model, nnx.BatchStat), logits)

    (loss, (new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new_stats, logits, grads


def train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_cfg: LossConfig,
    ema_decay: float,
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on ``images`` ``(B, H, W, C)`` HU and ``labels`` ``(B, H, W)``; the moving
    averages (if ``state`` keeps them) move towards the new weights at :func:`ema_rate` (``ema_decay``)."""

    loss, batch_stats, logits, grads = loss_and_grads(
        graphdef, loss_cfg, state.params, state.batch_stats, images, labels
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    def keep_if_bad(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    params = keep_if_bad(params, state.params)
    batch_stats = keep_if_bad(batch_stats, state.batch_stats)
    ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
    if ema_params is not None:  # a skipped step leaves the averages as they were too
        rate = jnp.where(finite, ema_rate(state.step, ema_decay), 0.0)
        ema_params = optax.incremental_update(params, ema_params, rate)
        ema_batch_stats = optax.incremental_update(batch_stats, ema_batch_stats, rate)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=keep_if_bad(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        bad_in_a_row=jnp.where(finite, 0, state.bad_in_a_row + 1),
        ema_params=ema_params,
        ema_batch_stats=ema_batch_stats,
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **voxel_counts(logits, labels)}
    return new_state, metrics


def make_train_step(graphdef, tx, loss_cfg: LossConfig, *, ema_decay: float = 0.0, **jit_kwargs):
    """``train_step`` jitted with the state donated (its buffers are reused for the new state) and
    calcjax's compiler options (``calcjax.core.compile_cache.compiler_options``)."""
    step = functools.partial(train_step, graphdef, tx, loss_cfg, ema_decay)
    jit_kwargs.setdefault("compiler_options", compile_cache.compiler_options())
    return jax.jit(step, donate_argnums=(0,), **jit_kwargs)


def eval_logits(
    graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State, images: jax.Array
) -> jax.Array:
    """Logits in eval mode (BatchNorm running statistics); ``graphdef`` from :func:`create_state`."""
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    return model(images)


def make_optimizer(
    *, learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float, grad_clip: float
) -> optax.GradientTransformation:
    """AdamW with linear warm-up to ``learning_rate`` and cosine decay to 0 at ``total_steps``, after
    clipping the gradient to global norm ``grad_clip``."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=max(warmup_steps, 1), decay_steps=max(total_steps, warmup_steps + 1)
    )
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(schedule, weight_decay=weight_decay))
