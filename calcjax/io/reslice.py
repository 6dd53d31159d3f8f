"""Thick slices from a thin-slice scan: what a thicker axial reconstruction of the same patient shows.

A non-gated chest CT is read at 5 mm slices, a gated calcium scan at 2.5-3 mm. :func:`thick_slices` turns a
thin scan and its calcium labels into the thicker reconstruction: each new slice of thickness ``T`` mm is
the overlap-weighted mean of the thin slices it covers (a box slice profile, slices taken as thick as their
increment), contiguous, starting at the scan's first slice edge; a partial slab at the far end is dropped.
Partial volume follows: small or faint plaques fall below 130 HU and vanish, as they do in a real thick
reconstruction.

Labels: a thick voxel is calcium when its HU is at least ``calcjax.core.agatston.CALCIUM_THRESHOLD_HU``
and the thin voxels it covers hold a label; its artery is the one covering the most thickness there
(ties: the lower label). Bright voxels with no label under them (bone, aortic calcium) stay background.

Axes: volumes ``(Z, H, W)`` with z ascending along the grid's slice normal; thicknesses and spacings in mm.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calcjax.core.agatston import CALCIUM_THRESHOLD_HU
from calcjax.io.geometry import Grid


def slab_weights(num_slices: int, increment_mm: float, thickness_mm: float) -> np.ndarray:
    """``(num_thick, num_slices)``: the share of each thick slice's thickness that each thin slice covers
    (rows sum to 1). Thin slice ``i`` spans ``[i*d, (i+1)*d)`` mm, thick slice ``j`` ``[j*T, (j+1)*T)``."""
    if not thickness_mm >= increment_mm > 0:
        raise ValueError(
            f"thick slices of {thickness_mm} mm need a thin slice increment in (0, {thickness_mm}] mm, "
            f"got {increment_mm} mm"
        )
    num_thick = int(np.floor(num_slices * increment_mm / thickness_mm + 1e-9))
    if num_thick < 1:
        raise ValueError(
            f"a scan of {num_slices} slices at {increment_mm} mm is thinner than {thickness_mm} mm"
        )
    thin = np.arange(num_slices + 1) * increment_mm  # slice edges
    thick = np.arange(num_thick + 1) * thickness_mm
    lo = np.maximum(thick[:-1, None], thin[None, :-1])
    hi = np.minimum(thick[1:, None], thin[None, 1:])
    return np.clip(hi - lo, 0.0, None) / thickness_mm


def thick_labels(hu: np.ndarray, lab: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """uint8 ``(num_thick, H, W)`` labels of the thick HU ``hu`` from thin labels ``lab`` ``(Z, H, W)``
    (module docstring)."""
    out = np.zeros(hu.shape, np.uint8)
    classes = [int(k) for k in np.unique(lab) if k]
    for j, row in enumerate(weights):
        covered = np.flatnonzero(row)
        best, cover = np.zeros(hu.shape[1:], np.uint8), np.zeros(hu.shape[1:], np.float64)
        for k in classes:
            c = np.tensordot(row[covered], lab[covered] == k, axes=1)
            take = c > cover
            best[take], cover[take] = k, c[take]
        out[j] = np.where(hu[j] >= CALCIUM_THRESHOLD_HU, best, 0)
    return out


@dataclasses.dataclass(frozen=True)
class Resliced:
    """A thick reconstruction: ``hu`` float32 ``(Z', H, W)``, ``labels`` uint8 or None, its ``grid``."""

    hu: np.ndarray
    labels: np.ndarray | None
    grid: Grid


def thick_slices(hu: np.ndarray, labels: np.ndarray | None, grid: Grid, thickness_mm: float) -> Resliced:
    """The scan ``hu`` ``(Z, H, W)`` on ``grid`` (and its ``labels``) as contiguous slices of
    ``thickness_mm`` (module docstring); the new grid's origin is the first thick slice's centre."""
    dz = float(grid.spacing[0])
    weights = slab_weights(hu.shape[0], dz, float(thickness_mm))
    thick = np.tensordot(weights, hu.astype(np.float32), axes=1).astype(np.float32)
    shift_mm = thickness_mm / 2.0 - dz / 2.0  # first thick centre from the first thin centre, along z
    origin = tuple(float(v) for v in np.asarray(grid.origin) + grid.normal * shift_mm)
    new_grid = dataclasses.replace(
        grid, shape=thick.shape, spacing=(float(thickness_mm), *grid.spacing[1:]), origin=origin
    )
    new_labels = None if labels is None else thick_labels(thick, labels, weights)
    return Resliced(thick, new_labels, new_grid)
