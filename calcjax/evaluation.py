"""Whole-scan validation during training: loss, voxel P / R / F1 and Agatston risk accuracy on the val split.

Each process evaluates every ``process_count``-th scan on its own devices (a mesh of
``jax.local_devices()``; the replicated train state's local copy is used, so no cross-host collective runs
inside the forward pass); the per-scan :class:`calcjax.metrics.ScanSummary` counts and losses are then
gathered from all processes (``multihost_utils.process_allgather``), so every process computes the same
figures with ``calcjax.metrics.evaluate``. ``val_loss`` is the mean over slices of each slice's own
bootstrap-IoU loss with rho = 1 (every pixel). A scan's slices go through in fixed batches (the last padded by
repeating its last slice; padded slices do not count in the loss or the labels).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from calcjax import input_pipeline, losses, metrics
from calcjax import model as model_lib
from calcjax import train_step as ts


def _local_copy(tree, sharding: NamedSharding):
    """A replicated global pytree -> the same values replicated on this process's devices only."""
    return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), sharding), tree)


class Evaluator:
    """Validation over whole scans; ``batch_size`` slices per forward on this process's devices."""

    def __init__(self, graphdef, batch_size: int, loss_cfg: ts.LossConfig):
        devices = jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        n = len(devices)
        self.batch_size = max(-(-batch_size // n) * n, n)
        self._rep = NamedSharding(self.mesh, PartitionSpec())
        self._dat = NamedSharding(self.mesh, PartitionSpec("data"))

        def forward(params, batch_stats, images, labels, weights):
            logits = ts.eval_logits(graphdef, params, batch_stats, images)
            # The bootstrap-IoU loss of each slice alone (rho = 1: every pixel), summed over real slices.
            per_slice = jax.vmap(
                lambda lg, lb: losses.bootstrap_iou_loss(
                    lg[None], lb[None], **loss_cfg.kwargs(rho=1.0, k_min=1)
                )
            )(logits, labels)
            return model_lib.labels_from_logits(logits), (per_slice * weights).sum()

        self.forward = jax.jit(forward, out_shardings=(self._dat, self._rep))

    def predict_scan(self, params, batch_stats, images: np.ndarray, labels: np.ndarray | None):
        """Predicted labels ``(Z, H, W)`` and the summed per-slice loss over the scan's slices."""
        z, b = images.shape[0], self.batch_size
        preds, loss_sum = [], 0.0
        for start in range(0, z, b):
            chunk = images[start : start + b].astype(np.float32)
            lab = labels[start : start + b] if labels is not None else np.zeros(chunk.shape[:3], np.uint8)
            real = len(chunk)
            weights = np.zeros(b, np.float32)
            weights[:real] = 1.0
            if real < b:  # pad to a fixed batch: one compilation
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - real, axis=0)])
                lab = np.concatenate([lab, np.repeat(lab[-1:], b - real, axis=0)])
            pred, loss = self.forward(
                params,
                batch_stats,
                jax.device_put(chunk, self._dat),
                jax.device_put(lab.astype(np.int32), self._dat),
                jax.device_put(weights, self._dat),
            )
            preds.append(np.asarray(pred)[:real])
            loss_sum += float(loss)
        return np.concatenate(preds), loss_sum

    def evaluate(self, state: ts.TrainState, split: input_pipeline.ShardSplit, max_scans: int = 0) -> dict:
        """Validation figures over the labelled scans of ``split`` (the first ``max_scans``; 0 = all)."""
        scans = [s for s in split.scans if s.labelled]
        if max_scans:
            scans = scans[:max_scans]
        if not scans:
            return {}
        params = _local_copy(state.params, self._rep)
        batch_stats = _local_copy(state.batch_stats, self._rep)
        pid, pcount = jax.process_index(), jax.process_count()
        sub = dataclasses.replace(split, scans=tuple(scans))
        rows = []  # (scan index, summary vector, loss sum, slices) of this process's scans
        for k, item in enumerate(input_pipeline.iter_scans(sub, process_index=pid, process_count=pcount)):
            pred, loss_sum = self.predict_scan(params, batch_stats, item["images"], item["labels"])
            scan = item["scan"]
            s = metrics.summarize_scan(
                scan.scan_id, scan.protocol, pred, item["labels"], item["hu"], scan.spacing
            )
            index = pid + k * pcount
            rows.append(np.concatenate([[index, loss_sum, len(pred)], s.to_vector()]))
        width = 3 + metrics.VECTOR_SIZE
        per_process = -(-len(scans) // pcount)
        table = np.full((per_process, width), -1.0)
        if rows:
            table[: len(rows)] = np.stack(rows)
        if pcount > 1:
            from jax.experimental import multihost_utils

            table = np.asarray(multihost_utils.process_allgather(table)).reshape(-1, width)
        table = table[table[:, 0] >= 0]
        table = table[np.argsort(table[:, 0])]
        summaries = [
            metrics.ScanSummary.from_vector(r[3:], scans[int(r[0])].scan_id, scans[int(r[0])].protocol)
            for r in table
        ]
        report = metrics.evaluate(summaries, num_bootstrap=0 if len(summaries) < 2 else 200)
        fig = report["all"]["figures"]
        return {
            "val_loss": float(table[:, 1].sum() / max(table[:, 2].sum(), 1)),
            "val_voxel_precision": fig["voxel_precision"]["value"],
            "val_voxel_recall": fig["voxel_recall"]["value"],
            "val_voxel_f1": fig["voxel_f1"]["value"],
            "val_risk_accuracy": fig["risk_accuracy"]["value"],
            "val_scans": len(summaries),
        }
