"""Lesion completion: a predicted lesion is its whole footprint at the calcium threshold.

An Agatston lesion is a 2D 8-connected component of voxels >= 130 HU (``calcjax.core.agatston``), and a
reader scoring a scan marks lesions, not voxels: the scoring software takes each marked lesion's whole
component. The real COCA masks are built that way (every labelled 2D component of the sample's masks is
a whole >= 130 HU component; docs/experiments/, "What the models miss"), and so are 87% of the
phantom's labelled components. A phantom-trained network marks part of a real plaque and misses the rest
of its 130 HU footprint (docs/experiments/, "Lesion completion": recall by HU band), which shrinks the
lesion's area and with it its Agatston score. Off by default: the phantoms, which choose the scorer's
settings, chose off (docs/experiments/).

:func:`complete_lesions` applies the reader's rule to a prediction: every 2D component of candidate
voxels (>= the threshold, per slice) that holds predicted calcium becomes calcium whole, labelled with
the artery most of its predicted voxels carry (ties go to the lower label, as in ``agatston.score``).
A component larger than ``max_area_mm2`` is left as predicted: a plaque's cross-section is a few tens of
mm^2, where a calcified aortic wall, a valve or a bone edge the network touches is larger, and growing
into it would add its whole area to the score. Completion never adds a component the network did not
touch, so it finds no new lesion; it can only enlarge, merge or relabel the ones found (one under the
1 mm^2 Agatston minimum may grow to count). Pure numpy + scipy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from calcjax.core import agatston

_IN_PLANE_8 = np.zeros((3, 3, 3), bool)
_IN_PLANE_8[1] = True
"""8-connectivity within a slice, none across slices (an Agatston lesion is per slice)."""


def complete_lesions(
    pred: np.ndarray,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    max_area_mm2: float,
    threshold_hu: float = agatston.CALCIUM_THRESHOLD_HU,
) -> np.ndarray:
    """Completes each predicted lesion to its footprint at ``threshold_hu`` (module docstring).

    Args:
      pred: ``(Z, H, W)`` predicted labels, 0 background and 1-4 LM/LAD/LCX/RCA.
      hu: ``(Z, H, W)`` Hounsfield units of the same scan.
      spacing: ``(dz, dy, dx)`` in mm; only the in-plane ``dy, dx`` are used (component areas).
      max_area_mm2: largest component (in-plane area, mm^2) that is completed; 0 returns ``pred`` as is.
      threshold_hu: the calcium threshold (HU) whose components are lesions.

    Returns:
      Labels of ``pred``'s shape and dtype: ``pred`` with each touched component of at most
      ``max_area_mm2`` set to its majority artery; every other voxel as predicted.
    """
    pred = np.asarray(pred)
    hu = np.asarray(hu)
    if pred.ndim != 3 or pred.shape != hu.shape:
        raise ValueError(f"pred {pred.shape} and hu {hu.shape} must be equal (z, y, x) volumes")
    if not max_area_mm2 > 0:
        return pred
    components, n = ndimage.label(agatston.candidate_mask(hu, threshold_hu), structure=_IN_PLANE_8)
    if n == 0:
        return pred
    labels = np.clip(pred, 0, len(agatston.ARTERIES)).astype(np.int64)
    num_labels = len(agatston.ARTERIES) + 1
    votes = np.bincount(
        components.ravel() * num_labels + labels.ravel(), minlength=(n + 1) * num_labels
    ).reshape(n + 1, num_labels)
    area_mm2 = votes.sum(axis=1) * float(spacing[1]) * float(spacing[2])
    touched = votes[:, 1:].sum(axis=1) > 0
    complete = touched & (area_mm2 <= max_area_mm2)
    complete[0] = False  # label 0: the voxels below the threshold
    artery = 1 + np.argmax(votes[:, 1:], axis=1)  # first maximum: ties go to the lower label
    return np.where(complete[components], artery[components], pred).astype(pred.dtype)
