"""One scan's scoring in three stages, so that the pipelined scorer can run them side by side:

1. :func:`prepare` (host, no JAX: it runs in worker processes): read the scan, its calcium threshold and
   the heart region (``calcjax.inference.heart_region``, from HU alone);
2. the forward pass (``calcjax.inference.predictor.Predictor.predict``, in the process that holds the
   devices);
3. :func:`final_labels` and the row (host): the labels kept in the heart region and completed, the score
   row and the scan's files.

With ``forward_in_heart_box`` the forward pass sees only the heart region's boxes (:func:`heart_boxes`):
the region's slices, in slabs of a batch each, every slab in an in-plane window whose sides take a few
fixed sizes (``BOX_SIDES_PX`` or the slice's own, so that a cohort compiles a bounded number of shapes)
around the region's extent in that slab with ``BOX_MARGIN_PX`` pixels of context. A region is broad at
the lungs' apex and narrow at the heart, so windows per slab hold about half the pixels of one window for
the whole region (measured on the real chest scans by ``bench/score.py --pipeline``).
Voxels outside the boxes are outside the region, where the scorer removes every label anyway; inside them
the network has its 2.5D neighbours as in the whole scan but sees less in-plane context at a window's
edge, so a few labels may differ (``bench/score.py --pipeline`` measures how many).

The serial scorer runs the three in a row, the pipelined one (``calcjax.score.pipeline``) overlaps them
across scans; both call these functions, so their rows are the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calcjax.core import agatston
from calcjax.data import scan_sources
from calcjax.inference import heart_region, postprocess
from calcjax.io import preprocess
from calcjax.score import rows as score_rows


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A scan read and ready for the forward pass: ``threshold_hu`` (the one the row's figures use) and
    the heart region (None when the scorer keeps every voxel)."""

    loaded: scan_sources.LoadedScan
    threshold_hu: float
    region: heart_region.HeartRegion | None


BOX_MARGIN_PX = 48  # in-plane context around the region's extent (the network's field reaches further)
# Window sides (pixels, multiples of 64); a region wider than the largest gets the slice's side. A cohort
# of 512 x 512 scans meets at most 7 x 7 window shapes, each compiled once (and kept in the compilation
# cache).
BOX_SIDES_PX = (128, 192, 256, 320, 384, 448)


@dataclasses.dataclass(frozen=True)
class Failed:
    """A scan that could not be scored: its ``errors.jsonl`` line (no path, no header value)."""

    line: dict


def prepare(scan: scan_sources.ScanInput, use_heart_region: bool, kvp_specific_threshold: bool):
    """Stage 1 of ``scan``: :class:`Prepared`, or :class:`Failed` when it cannot be read or has no
    usable threshold."""
    try:
        loaded = scan.load()
        threshold = agatston.threshold_for(
            score_rows.scan_kvp(loaded), kvp_specific_threshold=kvp_specific_threshold
        )
        region = heart_region.heart_region(loaded.hu, loaded.grid.spacing) if use_heart_region else None
    except Exception as e:  # a cohort run records each bad scan and goes on
        return Failed(score_rows.error_line(scan, e))
    return Prepared(loaded, threshold, region)


def _window(lo: int, hi: int, size: int, align: int) -> tuple[int, int]:
    """The ``[start, end)`` of the smallest ``BOX_SIDES_PX`` side holding ``[lo - margin, hi + margin)``
    within ``[0, size)``, its start a multiple of ``align`` (the network's downsampling grid)."""
    need = hi - lo + 2 * BOX_MARGIN_PX
    side = next((s for s in BOX_SIDES_PX if s >= need and s < size), size)
    start = min(max(0, (lo + hi - side) // 2), size - side)
    start -= start % align
    return start, min(size, start + side)


def heart_boxes(
    region: heart_region.HeartRegion | None, slab: int, align: int
) -> list[preprocess.Window] | None:
    """The boxes (``calcjax.io.preprocess.Window``) of a found region, one per ``slab`` slices from its
    first slice to its last (a slab the region misses has none; ``align``: the network's multiple), or
    None when there is none to use (no region, not found, empty)."""
    if region is None or not region.found:
        return None
    nz, ny, nx = region.mask.shape
    zs = np.flatnonzero(region.mask.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    boxes = []
    for k0 in range(int(zs[0]), int(zs[-1]) + 1, slab):
        k1 = min(k0 + slab, int(zs[-1]) + 1)
        in_plane = region.mask[k0:k1].any(axis=0)  # (H, W)
        ys, xs = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
        if ys.size:
            y0, y1 = _window(int(ys[0]), int(ys[-1]) + 1, ny, align)
            x0, x1 = _window(int(xs[0]), int(xs[-1]) + 1, nx, align)
            boxes.append(preprocess.Window(k0, k1, y0, y1, x0, x1))
    return boxes


def final_labels(prepared: Prepared, raw: np.ndarray, completion_mm2: float) -> tuple[np.ndarray, str]:
    """(labels, heart-region status) of the forward pass's ``raw`` labels: kept in the prepared region
    and completed (``calcjax.inference.postprocess.restrict_and_complete``)."""
    loaded = prepared.loaded
    post = postprocess.PostProcess(prepared.region is not None, completion_mm2)
    return postprocess.restrict_and_complete(
        raw, loaded.hu, loaded.grid.spacing, post, prepared.threshold_hu, region=prepared.region
    )
