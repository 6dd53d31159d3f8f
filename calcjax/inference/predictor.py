"""Whole-scan inference: a jitted, batched forward pass sharded over this process's devices.

``Predictor.predict(hu)`` takes one scan's int16 HU volume ``(Z, H, W)``, builds each batch's 2.5D stacks
``(B, H, W, C)`` from it as it goes (``calcjax.io.preprocess.slice_stacks``: memory stays one volume), and
returns its predicted labels, uint8 ``(Z, H, W)`` (0 background, 1 LM, 2 LAD, 3 LCX, 4 RCA; rule:
``model.labels_from_logits``). Slices go through in fixed batches of ``batch_size`` (the last one padded
by repeating its last slice, so one compilation serves every scan of a size); slices whose H or W is not a
multiple of the model's ``2 ** depth`` are padded with air (-1000 HU) and the labels cropped back.
``predict_in_boxes(hu, boxes)`` runs it only on given slices and in-plane windows (the scorer's heart
boxes), the rest of the volume zero. A model
with ``pixel_mm`` > 0 gets the scan resampled in-plane to that pixel size and its labels come back on the
scan's grid (``calcjax.io.pixel_size``); ``predict`` then needs the scan's spacing.

Validation during training runs through the same predictor (``calcjax.train.evaluation``): built once from the
train state's graph, :meth:`Predictor.set_weights` gives it each evaluation's weights (no recompilation),
and :meth:`Predictor.predict_with_loss` also returns the summed per-slice bootstrap-IoU loss (rho = 1,
every pixel) against reference labels.

The mesh (``sharding.make_mesh``) holds only this process's devices (``jax.local_devices()``): on several
hosts each process scores its own scans with no cross-host collective. Up to ``max_in_flight`` batches are
dispatched ahead of the one being read back, so host-to-device copies, compute and copies back overlap on
accelerators.
A NaN or infinite logit anywhere in a scan raises :class:`NonFiniteOutputError` (the scorer records an
error row for the scan). ``forward_seconds`` accumulates the time from the first dispatch to the last
labels back on the host (the jitted forward with its transfers) less the time spent building stacks on
the host, for the scorer's overhead figure.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calcjax.core import sharding
from calcjax.core.hu import AIR_HU
from calcjax.io import pixel_size, preprocess
from calcjax.model import checkpoint, losses
from calcjax.model import network as model_lib


class NonFiniteOutputError(ValueError):
    """The forward pass gave a NaN or infinite logit on a scan: its labels would be arbitrary (a NaN
    background probability reads as "no calcium"), so the scan is an error, never a score."""

    kind = "non_finite_logits"


class Predictor:
    """Jitted eval-mode forward of a :class:`calcjax.model.network.DenseRAUnet` over local devices."""

    @classmethod
    def from_checkpoint(
        cls,
        path: str | None,
        which: str = "best",
        *,
        batch_size: int = 0,
        min_calcium_probability: float = 0.5,
    ) -> Predictor:
        """The predictor of a training workdir, step folder or model file (``None``: the shipped model;
        ``calcjax.model.checkpoint.load_for_inference``)."""
        _, model = checkpoint.load_for_inference(path, which)
        return cls(model, batch_size=batch_size, min_calcium_probability=min_calcium_probability)

    def __init__(
        self,
        model: model_lib.DenseRAUnet,
        *,
        batch_size: int = 0,
        devices=None,
        max_in_flight: int = 4,
        loss_kwargs: dict | None = None,
        min_calcium_probability: float = 0.5,
    ):
        """``batch_size``: slices per forward (0: 4 per device), rounded up to a multiple of the devices;
        ``max_in_flight``: batches dispatched ahead of the one being read back (bounds device memory);
        ``loss_kwargs``: ``losses.bootstrap_iou_loss`` settings for :meth:`predict_with_loss`;
        ``min_calcium_probability``: a voxel is calcium where its calcium probability
        (:meth:`calcium_probability`) exceeds it (``model.labels_from_logits``)."""
        devices = list(devices if devices is not None else jax.local_devices())
        self.mesh = sharding.make_mesh(devices)
        n = len(devices)
        batch_size = batch_size or 4 * n
        self.batch_size = -(-batch_size // n) * n
        self.multiple = 2 ** len(model.cfg.widths)
        self.in_channels = model.cfg.in_channels
        self.pixel_mm = model.cfg.pixel_mm
        self.min_calcium_probability = float(min_calcium_probability)
        model.eval()
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        self._data = sharding.data_sharding(self.mesh)
        self._rep = sharding.replicated(self.mesh)
        self._state = jax.device_put((params, batch_stats), self._rep)

        def forward(state, images):
            m = nnx.merge(graphdef, *state, copy=True)
            logits = m(images.astype(jnp.float32))
            finite = jnp.all(jnp.isfinite(logits), axis=(1, 2, 3))  # (B,) per slice
            return model_lib.labels_from_logits(logits, self.min_calcium_probability), finite

        def forward_with_loss(state, images, labels, weights):
            m = nnx.merge(graphdef, *state, copy=True)
            logits = m(images.astype(jnp.float32))
            per_slice = jax.vmap(lambda lg, lb: losses.bootstrap_iou_loss(lg[None], lb[None], **loss_kwargs))(
                logits, labels
            )  # each slice's own loss; padded slices weigh 0
            return model_lib.labels_from_logits(logits, self.min_calcium_probability), (
                per_slice * weights
            ).sum()

        def forward_calcium_probability(state, images):
            m = nnx.merge(graphdef, *state, copy=True)
            logits = m(images.astype(jnp.float32))
            return 1.0 - model_lib.background_probability(logits)

        self._forward = jax.jit(forward, out_shardings=(self._data, self._data))
        self._forward_calcium_probability = jax.jit(forward_calcium_probability, out_shardings=self._data)
        self._forward_with_loss = (
            jax.jit(forward_with_loss, out_shardings=(self._data, self._rep)) if loss_kwargs else None
        )
        self.max_in_flight = max_in_flight
        self.forward_seconds = 0.0
        self.slices = 0

    def set_weights(self, params, batch_stats) -> None:
        """Replaces the weights (same structure: no recompilation). Global replicated arrays (a train
        state's) are copied from this process's first shard onto its own devices."""

        def local(x):
            x = x.addressable_data(0) if isinstance(x, jax.Array) else x
            return jax.device_put(x, self._rep)

        self._state = jax.tree.map(local, (params, batch_stats))

    def _model_grid(self, hu: np.ndarray, spacing) -> np.ndarray:
        """``hu`` on the model's pixel grid (itself for a native-pixel model)."""
        if self.pixel_mm > 0 and spacing is None:
            raise ValueError(f"this model reads {self.pixel_mm} mm pixels: predict needs the scan's spacing")
        return pixel_size.to_model_grid(hu, spacing, self.pixel_mm)  # hu itself at native pixels

    def predict_with_loss(self, hu: np.ndarray, labels: np.ndarray, spacing=None) -> tuple[np.ndarray, float]:
        """Labels uint8 ``(Z, H, W)`` of one scan and its summed per-slice loss against ``labels``
        ``(Z, H, W)`` (validation). ``spacing`` ``(dz, dy, dx)`` mm: needed by a model with ``pixel_mm``,
        whose loss is taken on its own grid and whose labels come back on the scan's."""
        if self._forward_with_loss is None:
            raise ValueError("this Predictor was built without loss_kwargs")
        native_hw = hu.shape[1:]
        hu = self._model_grid(hu, spacing)
        z, h, w = hu.shape
        labels = pixel_size.labels_to_model_grid(labels, spacing, self.pixel_mm)
        labels = np.pad(labels, ((0, 0), (0, -h % self.multiple), (0, -w % self.multiple)))  # background
        b = self.batch_size
        out = np.empty((z, h, w), np.uint8)
        loss_sum = 0.0
        for _, start, real, chunk in self._window_batches(hu, [_whole(hu)]):
            lab = _pad_batch(labels[start : start + b], b)
            weights = np.zeros(b, np.float32)
            weights[:real] = 1.0
            pred, loss = self._forward_with_loss(
                self._state,
                jax.device_put(chunk, self._data),
                jax.device_put(lab.astype(np.int32), self._data),
                jax.device_put(weights, self._data),
            )
            out[start : start + real] = np.asarray(pred)[:real, :h, :w]
            loss_sum += float(loss)
        return pixel_size.labels_to_native(out, native_hw), loss_sum  # out itself at native pixels

    def calcium_probability(self, hu: np.ndarray, spacing=None) -> np.ndarray:
        """float32 ``(Z, H, W)``: each voxel's calcium probability, 1 - P(background) (any artery; the
        labels of :meth:`predict` are calcium exactly where it exceeds 0.5), for figures that need more
        than the labels (``calcjax.research.qrm_check``). A ``pixel_mm`` model's map comes back on the scan's
        grid by linear interpolation."""
        native_hw = hu.shape[1:]
        hu = self._model_grid(hu, spacing)
        z, h, w = hu.shape
        out = np.empty((z, h, w), np.float32)
        for _, start, real, chunk in self._window_batches(hu, [_whole(hu)]):
            p = self._forward_calcium_probability(self._state, jax.device_put(chunk, self._data))
            out[start : start + real] = np.asarray(p)[:real, :h, :w]
        return pixel_size.probability_to_native(out, native_hw)  # out itself at native pixels

    def predict(self, hu: np.ndarray, spacing=None) -> np.ndarray:
        """Labels uint8 ``(Z, H, W)`` of one scan's int16 HU volume ``(Z, H, W)``; ``spacing`` ``(dz, dy,
        dx)`` mm is needed by a model with ``pixel_mm`` (resampled to its grid and the labels back).

        Raises :class:`NonFiniteOutputError` (naming the slices) when any logit of the scan is not finite.
        """
        if hu.ndim != 3:
            raise ValueError(f"hu must be a (Z, H, W) volume, got {hu.shape}")
        native_hw = hu.shape[1:]
        hu = self._model_grid(hu, spacing)
        out = self._predict_windows(hu, [_whole(hu)])
        return pixel_size.labels_to_native(out, native_hw)  # out itself at native pixels

    def predict_in_boxes(self, hu: np.ndarray, boxes) -> np.ndarray:
        """Labels uint8 ``(Z, H, W)`` of a native-pixel model inside ``boxes`` only, zero elsewhere:
        each box (a ``calcjax.io.preprocess.Window``, as ``calcjax.score.stages.heart_boxes`` gives) gets its
        slices ``[k0, k1)`` predicted in its in-plane window, their 2.5D neighbours taken from the whole
        volume (so along z a box's labels are the whole scan's; in-plane the network sees the window's
        context only). Boxes must not share slices. Raises like :meth:`predict`."""
        if hu.ndim != 3:
            raise ValueError(f"hu must be a (Z, H, W) volume, got {hu.shape}")
        if self.pixel_mm > 0:
            raise ValueError(f"boxes lie on the scan's pixels; this model reads {self.pixel_mm} mm pixels")
        return self._predict_windows(hu, boxes)

    def _window_batches(self, hu: np.ndarray, boxes):
        """``(box, start, real, batch)`` for every batch of every box: ``batch`` ``(B, h', w', C)`` the 2.5D
        stacks of slices ``start..start+real-1`` in the box's window, padded with air to the model's
        multiple in-plane and to the batch size along its first axis."""
        context = (self.in_channels - 1) // 2
        for box in boxes:
            window = hu[:, box.y0 : box.y1, box.x0 : box.x1]
            ph, pw = -(box.y1 - box.y0) % self.multiple, -(box.x1 - box.x0) % self.multiple
            for start in range(box.k0, box.k1, self.batch_size):
                chunk = preprocess.slice_stacks(window, context, start, min(start + self.batch_size, box.k1))
                if ph or pw:
                    chunk = np.pad(chunk, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=AIR_HU)
                yield box, start, len(chunk), _pad_batch(chunk, self.batch_size)

    def _predict_windows(self, hu: np.ndarray, boxes) -> np.ndarray:
        """Labels uint8 ``(Z, H, W)`` of ``hu`` (on the model's grid) inside ``boxes``, zero elsewhere, with
        up to ``max_in_flight`` batches dispatched ahead of the one read back."""
        out = np.zeros(hu.shape, np.uint8)
        pending: collections.deque = collections.deque()  # batches in flight (transfers and compute overlap)
        bad_slices: list[int] = []

        def read_back():
            box, start, real, (labels, finite) = pending.popleft()
            h, w = box.y1 - box.y0, box.x1 - box.x0
            out[start : start + real, box.y0 : box.y1, box.x0 : box.x1] = np.asarray(labels)[:real, :h, :w]
            bad_slices.extend(start + int(i) for i in np.flatnonzero(~np.asarray(finite)[:real]))

        t0, stacking = time.perf_counter(), 0.0
        batches = self._window_batches(hu, boxes)
        while True:
            t_stack = time.perf_counter()
            item = next(batches, None)
            stacking += time.perf_counter() - t_stack
            if item is None:
                break
            box, start, real, chunk = item
            pending.append((box, start, real, self._forward(self._state, jax.device_put(chunk, self._data))))
            self.slices += real
            if len(pending) > self.max_in_flight:
                read_back()
        while pending:
            read_back()
        self.forward_seconds += time.perf_counter() - t0 - stacking  # stacking counts as host work
        if bad_slices:
            raise NonFiniteOutputError(
                f"non-finite logits on {len(bad_slices)} of {hu.shape[0]} slices (first: slice "
                f"{min(bad_slices)}): damaged weights or input; the scan is not scored"
            )
        return out


def _whole(hu: np.ndarray) -> preprocess.Window:
    """Every slice and pixel of a ``(Z, H, W)`` volume as one window."""
    z, h, w = hu.shape
    return preprocess.Window(0, z, 0, h, 0, w)


def _pad_batch(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with its last item repeated up to ``size`` items along the first axis."""
    return a if len(a) >= size else np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)])
