"""In-plane resampling to the model's physical pixel size (``model.pixel_mm``).

Gated calcium scans have 0.35-0.5 mm pixels, chest CT 0.65-0.8 mm: at native resolution the same artery
is twice as wide on one as on the other. A model trained with ``pixel_mm`` > 0 sees every slice resampled
so one pixel is ``pixel_mm`` mm in both in-plane axes, in training (``input_pipeline.augment`` folds the
factor into its crop's affine) and in inference (here: the scan to the model's grid, the predicted labels
back onto the scan's own grid). ``pixel_mm`` = 0 keeps native pixels (every model before this module).

Grid convention (``scipy.ndimage.zoom(grid_mode=True)``): pixels are areas; the first and last pixel
edges of both grids coincide, so the field of view is kept exactly and the sizes are
``round(n * spacing / pixel_mm)``. HU are resampled linearly (order 1, then rounded to int16), labels by
nearest neighbour (order 0): the scorer's calcium mask is the predicted label AND HU >= 130 on the scan's
own grid, so a label's outline that is one model pixel coarse is cut back to the scan's calcium voxels.
Axes: volumes ``(Z, H, W)``; ``spacing`` ``(dz, dy, dx)`` mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def model_shape(hw: tuple[int, int], spacing_yx, pixel_mm: float) -> tuple[int, int]:
    """``(H', W')`` of an ``(H, W)`` slice with pixel ``spacing_yx`` mm on the ``pixel_mm`` grid."""
    if pixel_mm <= 0:
        return tuple(hw)
    return tuple(max(1, int(round(n * float(s) / pixel_mm))) for n, s in zip(hw, spacing_yx, strict=True))


def _zoom(volume: np.ndarray, shape_hw: tuple[int, int], order: int) -> np.ndarray:
    z, h, w = volume.shape
    if (h, w) == tuple(shape_hw):
        return volume
    factors = (1.0, shape_hw[0] / h, shape_hw[1] / w)
    return ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True, prefilter=False)


def to_model_grid(hu: np.ndarray, spacing, pixel_mm: float) -> np.ndarray:
    """int16 HU ``(Z, H', W')`` on the ``pixel_mm`` grid (``hu`` itself when ``pixel_mm`` is 0 or the
    grids agree)."""
    if pixel_mm <= 0:
        return hu
    shape = model_shape(hu.shape[1:], spacing[1:], pixel_mm)
    if shape == tuple(hu.shape[1:]):
        return hu
    out = _zoom(hu.astype(np.float32), shape, order=1)
    return np.clip(np.rint(out), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)


def labels_to_model_grid(labels: np.ndarray, spacing, pixel_mm: float) -> np.ndarray:
    """Reference labels ``(Z, H, W)`` on the ``pixel_mm`` grid (nearest neighbour)."""
    if pixel_mm <= 0:
        return labels
    return _zoom(labels, model_shape(labels.shape[1:], spacing[1:], pixel_mm), order=0)


def labels_to_native(labels: np.ndarray, native_hw: tuple[int, int]) -> np.ndarray:
    """Labels ``(Z, H', W')`` of the model grid back on the scan's ``(H, W)`` grid (nearest neighbour)."""
    return _zoom(labels, tuple(native_hw), order=0)


def probability_to_native(probability: np.ndarray, native_hw: tuple[int, int]) -> np.ndarray:
    """A float probability map ``(Z, H', W')`` of the model grid back on the scan's ``(H, W)`` grid
    (linear interpolation)."""
    return _zoom(probability, tuple(native_hw), order=1)


def crop_zoom(spacing_yx, pixel_mm: float) -> float:
    """The factor a training crop's affine multiplies its zoom by, so one crop pixel is ``pixel_mm`` mm
    (1 when ``pixel_mm`` is 0). Pixels are square in practice; the mean of the two axes is used."""
    if pixel_mm <= 0:
        return 1.0
    return float(np.mean([float(s) for s in spacing_yx])) / pixel_mm
