"""Whole-scan validation during training: loss, voxel P / R / F1 and Agatston risk accuracy on the val split,
and the running train figures both trainers log.

Each process evaluates every ``process_count``-th scan through the scorer's own forward pass
(``calcjax.inference.predictor.Predictor``, on this process's devices, given the replicated train state's
local copy with ``set_weights``, so no cross-host collective runs inside the forward pass); the per-scan
:class:`calcjax.core.metrics.ScanSummary` counts and losses are then gathered from all processes
(``multihost_utils.process_allgather``), so every process computes the same figures with
:func:`validation_figures`, which the PyTorch trainer uses too. ``val_loss`` is the mean over slices of
each slice's own bootstrap-IoU loss with rho = 1 (every pixel).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from calcjax.core import metrics
from calcjax.core.agatston import CALCIUM_THRESHOLD_HU as CALCIUM_HU
from calcjax.data import input_pipeline
from calcjax.inference import postprocess, qrm_figures
from calcjax.inference import predictor as inference
from calcjax.train import step as ts


def validation_figures(
    summaries: list[metrics.ScanSummary], loss_sum: float, num_slices: int, prefix: str = "val"
) -> dict:
    """The figures a validation logs (both trainers), each key ``{prefix}_...``: ``loss`` (mean per-slice
    loss), voxel precision / recall / F1, artery-aware voxel F1, lesion sensitivity, false-positive lesions
    per scan and risk accuracy over ``summaries`` (bootstrap-free for speed), and ``scans``."""
    fig = metrics.evaluate(summaries, num_bootstrap=0)["all"]["figures"]
    return {
        f"{prefix}_loss": float(loss_sum / max(num_slices, 1)),
        f"{prefix}_voxel_precision": fig["voxel_precision"]["value"],
        f"{prefix}_voxel_recall": fig["voxel_recall"]["value"],
        f"{prefix}_voxel_f1": fig["voxel_f1"]["value"],
        f"{prefix}_artery_voxel_f1": fig["voxel_f1_artery"]["value"],
        f"{prefix}_lesion_sensitivity": fig["lesion_sensitivity"]["value"],
        f"{prefix}_fp_lesions_per_scan": fig["fp_lesions_per_scan"]["value"],
        f"{prefix}_risk_accuracy": fig["risk_accuracy"]["value"],
        f"{prefix}_scans": len(summaries),
    }


class TrainMetrics:
    """Train loss and voxel counts accumulated between two logs (both trainers), and their log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.tp, self.fp, self.fn, self.steps = 0.0, 0, 0, 0, 0
        self.t0 = time.time()

    def add(self, loss: float, tp: int, fp: int, fn: int) -> None:
        """One finite step's loss and calcium voxel counts."""
        self.loss += float(loss)
        self.tp, self.fp, self.fn = self.tp + int(tp), self.fp + int(fp), self.fn + int(fn)
        self.steps += 1

    def line(self, skipped_steps: int) -> dict:
        """``train_loss``, ``train_voxel_f1``, ``steps_per_s`` since the last reset, ``skipped_steps``; then
        resets."""
        out = {
            "train_loss": self.loss / max(self.steps, 1),
            "train_voxel_f1": float(metrics.f1_from_counts(self.tp, self.fp, self.fn)),
            "steps_per_s": self.steps / max(time.time() - self.t0, 1e-9),
            "skipped_steps": int(skipped_steps),
        }
        self.reset()
        return out


class Evaluator:
    """Validation over whole scans through a :class:`calcjax.inference.predictor.Predictor` of the train
    state's graph (``batch_size`` slices per forward on this process's devices)."""

    def __init__(self, graphdef, batch_size: int, loss_cfg: ts.LossConfig, params, batch_stats):
        """``graphdef``, ``params``, ``batch_stats``: the train state's (their values only shape the
        predictor; each :meth:`evaluate` sets the weights of its state)."""
        first = jax.tree.map(
            lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, (params, batch_stats)
        )
        model = nnx.merge(graphdef, *first, copy=True)
        self.predictor = inference.Predictor(
            model, batch_size=max(batch_size, 1), loss_kwargs=loss_cfg.kwargs(rho=1.0, k_min=1)
        )

    def evaluate_qrm(self, state: ts.TrainState, ref: qrm_figures.QrmReference) -> dict:
        """The QRM insert figures (``calcjax.inference.qrm_figures``, keys ``qrm_...``) of ``state``'s
        weights (``ts.inference_weights``); every process computes them alike (one small scan)."""
        self.predictor.set_weights(*ts.inference_weights(state))
        return qrm_figures.evaluate(self.predictor, ref)

    def evaluate(
        self,
        state: ts.TrainState,
        split: input_pipeline.ShardSplit,
        max_scans: int = 0,
        *,
        use_heart_region: bool = False,
        prefix: str = "val",
    ) -> dict:
        """Validation figures (keys ``{prefix}_...``) of ``state``'s weights (``ts.inference_weights``: the
        moving averages when the run keeps them) over the labelled scans of ``split`` (the first
        ``max_scans``; 0 = all). ``use_heart_region``: keep predicted calcium only in the heart's
        neighbourhood, as ``calcjax.score`` does by default (the real-sample figure: without it real
        scans' bone edges dominate); the loss is the network's, before the region."""
        scans = [s for s in split.scans if s.labelled]
        if max_scans:
            scans = scans[:max_scans]
        if not scans:
            return {}
        self.predictor.set_weights(*ts.inference_weights(state))
        pid, pcount = jax.process_index(), jax.process_count()
        sub = dataclasses.replace(split, scans=tuple(scans))
        rows = []  # (scan index, summary vector, loss sum, slices) of this process's scans
        for k, item in enumerate(input_pipeline.iter_scans(sub, process_index=pid, process_count=pcount)):
            scan = item["scan"]
            pred, loss_sum = self.predictor.predict_with_loss(item["hu"], item["labels"], scan.spacing)
            post = postprocess.PostProcess(use_heart_region=use_heart_region)
            pred, _ = postprocess.restrict_and_complete(pred, item["hu"], scan.spacing, post, CALCIUM_HU)
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
        return validation_figures(summaries, float(table[:, 1].sum()), int(table[:, 2].sum()), prefix)
