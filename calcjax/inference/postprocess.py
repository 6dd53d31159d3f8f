"""The scorer's chain from a scan to its predicted labels: the forward pass, then the heart region, then
lesion completion. Scoring, validation and the research probes call this one function, so the labels
they measure are the labels the scorer scores."""

from __future__ import annotations

import dataclasses

import numpy as np

from calcjax.inference import heart_region, lesion_completion


@dataclasses.dataclass(frozen=True)
class PostProcess:
    """``use_heart_region``: keep predicted calcium only in the heart's neighbourhood
    (``calcjax.inference.heart_region``); ``completion_mm2``: complete each predicted lesion to its whole
    >= ``threshold_hu`` 2D component up to this in-plane area in mm^2 (0: off;
    ``calcjax.inference.lesion_completion``)."""

    use_heart_region: bool = True
    completion_mm2: float = 0.0


def predict_labels(
    predictor, hu: np.ndarray, spacing, post: PostProcess, threshold_hu: float
) -> tuple[np.ndarray, str]:
    """(labels uint8 ``(Z, Y, X)``, heart-region status) of int16 HU ``hu`` ``(Z, Y, X)`` with voxel
    ``spacing`` ``(dz, dy, dx)`` mm: ``predictor.predict``, then :func:`restrict_and_complete`."""
    return restrict_and_complete(predictor.predict(hu, spacing), hu, spacing, post, threshold_hu)


def restrict_and_complete(
    pred: np.ndarray,
    hu: np.ndarray,
    spacing,
    post: PostProcess,
    threshold_hu: float,
    region: heart_region.HeartRegion | None = None,
) -> tuple[np.ndarray, str]:
    """``pred`` kept in the heart region (``region``, when it was already found for this scan) and its
    lesions completed (``post``); the status is the region's (``found`` / ``not_found``) or ``off``."""
    status = "off"
    if not post.use_heart_region:
        region = None
    elif region is None:
        region = heart_region.heart_region(hu, spacing)
    if region is not None:
        pred, status = heart_region.restrict(pred, region), region.status
    if post.completion_mm2:
        pred = lesion_completion.complete_lesions(pred, hu, spacing, post.completion_mm2, threshold_hu)
        if region is not None:  # a completed component may reach past the region's edge
            pred = heart_region.restrict(pred, region)
    return pred, status
