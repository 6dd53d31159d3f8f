"""Scoring one volume from Python, numpy in and out, no files: ``calcjax.score_volume``.

    import calcjax
    result = calcjax.score_volume(hu, spacing=(3.0, 0.4, 0.4))   # the shipped model
    result.agatston, result.risk_category, result.labels          # labels: uint8 (Z, Y, X), 0-4

The volume goes through the cohort scorer's own chain (``calcjax.inference.postprocess``: forward pass,
heart region, lesion completion) and ``calcjax.core.agatston.score``, so it scores as
``python -m calcjax.score`` scores the same scan. A model is compiled once per process and reused.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from calcjax.core import agatston
from calcjax.inference import postprocess
from calcjax.inference.predictor import Predictor
from calcjax.io import preprocess


@dataclasses.dataclass(frozen=True)
class VolumeScore:
    """``labels`` uint8 ``(Z, Y, X)`` (0 background, 1-4 LM/LAD/LCX/RCA: ``calcjax.core.agatston.ARTERIES``),
    ``scores`` (``calcjax.core.agatston.score``'s dict: agatston, per artery, volume, mass, risk category,
    lesions) and ``heart_region`` (``found`` / ``not_found`` / ``off``)."""

    labels: np.ndarray
    scores: dict
    heart_region: str

    @property
    def agatston(self) -> float:
        return self.scores["agatston"]

    @property
    def risk_category(self) -> int:
        return self.scores["risk_category"]


@functools.lru_cache(maxsize=4)
def _predictor(path: str | None, which: str) -> Predictor:
    return Predictor.from_checkpoint(path, which)


def _checked(hu, spacing) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``hu`` as int16 ``(Z, Y, X)`` and ``spacing`` as three floats, or ValueError naming the rule: no
    score from an image whose HU or geometry is undefined."""
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"hu: a (Z, Y, X) volume is needed, got shape {hu.shape}")
    if not np.issubdtype(hu.dtype, np.number) or not np.all(np.isfinite(hu)):
        raise ValueError("hu: every value must be a finite number of Hounsfield units")
    spacing = tuple(float(s) for s in np.asarray(spacing, np.float64).reshape(-1))
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"spacing: three finite voxel sizes > 0 in mm, (dz, dy, dx), are needed, got {spacing}"
        )
    return preprocess.hu_int16(hu), spacing


def score_volume(
    hu,
    spacing,
    model: str | Predictor | None = None,
    *,
    kvp: float = 120.0,
    kvp_specific_threshold: bool = False,
    use_heart_region: bool = True,
    lesion_completion_mm2: float = 0.0,
    mass_calibration: float | None = None,
) -> VolumeScore:
    """Scores one CT volume.

    ``hu``: ``(Z, Y, X)`` Hounsfield units, z ascending along the slice normal, rows and columns as in
    the DICOM images (``calcjax.io.geometry``); ``spacing``: ``(dz, dy, dx)`` in mm, dz the slice
    increment. ``model``: a training workdir, a step folder or a model file, or a ``Predictor``; None is
    the shipped model. ``kvp`` is read only with ``kvp_specific_threshold``; the other settings are
    ``python -m calcjax.score``'s (``calcjax.score.options.ScoreOptions``).
    """
    hu, spacing = _checked(hu, spacing)
    predictor = model if isinstance(model, Predictor) else _predictor(model, "best")
    threshold = agatston.threshold_for(kvp, kvp_specific_threshold=kvp_specific_threshold)
    post = postprocess.PostProcess(use_heart_region, float(lesion_completion_mm2))
    labels, status = postprocess.predict_labels(predictor, hu, spacing, post, threshold)
    scores = agatston.score(
        hu, labels, spacing, kvp=kvp, kvp_specific_threshold=kvp_specific_threshold,
        mass_calibration=mass_calibration,
    )  # fmt: skip
    return VolumeScore(labels, scores, status)
