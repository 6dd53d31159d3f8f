"""One scan from its files to the model's input: the single code path of ``data_prep.build`` and
``calcjax.score --dicom``.

- ``read_scan``: the DICOM series (``calcjax.io.dicom.read_series``) and its reference labels, if any
  (NIfTI checked against the grid, or COCA XML rasterised on it), optionally as thicker slices
  (``calcjax.io.reslice``: a thin gated scan as the thick reconstruction a chest protocol reads);
- ``hu_int16``: HU rounded and clipped to int16 (what a shard stores; the model sees exactly these values
  whichever route a scan takes);
- ``slice_stacks``: the 2.5D stacks of a run of slices, ``(n, H, W, C)`` with C = 2 * context + 1
  adjacent slices centred on each slice (edges replicate the first / last slice,
  ``records.stack_indices``); the scorer builds them batch by batch from the HU volume;
- ``scan_grid``: the manifest's geometry of a scan back as a :class:`calcjax.io.geometry.Grid`.

No jax here: imported by the shard writer's processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calcjax.io import dicom, geometry, labels, records, reslice

INT16_MIN, INT16_MAX = -32768, 32767


def read_scan(
    files, *, label_path: str | None, label_format: str | None, protocol: str | None = None,
    reslice_mm: float = 0.0,
):  # fmt: skip
    """``(Volume, labels or None)`` of one series; raises DicomError / LabelError with reasons.
    ``reslice_mm`` > 0: the scan and its labels as contiguous slices that thick (``calcjax.io.reslice``);
    the volume's metadata then says so (``slice_thickness_mm``, ``num_slices``, ``resliced_from_mm``)."""
    vol = dicom.read_series(files, protocol=protocol)
    lab = None
    if label_format == "nifti":
        lab = labels.read_nifti_label(label_path, vol.grid)
    elif label_format == "xml":
        lab = labels.read_coca_xml(label_path, vol.grid, vol.hu)
    if reslice_mm:
        thick = reslice.thick_slices(vol.hu, lab, vol.grid, reslice_mm)
        meta = {**vol.meta, "slice_thickness_mm": float(reslice_mm), "num_slices": thick.grid.shape[0],
                "resliced_from_mm": float(vol.grid.spacing[0])}  # fmt: skip
        vol, lab = dataclasses.replace(vol, hu=thick.hu, grid=thick.grid, meta=meta), thick.labels
    return vol, lab


def hu_int16(hu: np.ndarray) -> np.ndarray:
    """HU as int16 (rounded, clipped to the int16 range); int16 input is returned as is."""
    if hu.dtype == np.int16:
        return hu
    return np.clip(np.rint(hu), INT16_MIN, INT16_MAX).astype(np.int16)


@dataclasses.dataclass(frozen=True)
class Window:
    """Slices ``[k0, k1)`` of a ``(Z, H, W)`` volume in the in-plane window ``[y0, y1) x [x0, x1)``
    (pixels): where the forward pass runs (``Predictor.predict_in_boxes``; the scorer's heart boxes)."""

    k0: int
    k1: int
    y0: int
    y1: int
    x0: int
    x1: int


def slice_stacks(hu: np.ndarray, context: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """``(stop - start, H, W, 2*context+1)`` int16 stacks of slices ``start..stop-1`` of an int16
    ``(Z, H, W)`` volume (default: every slice; module docstring)."""
    nz = hu.shape[0]
    stop = nz if stop is None else min(stop, nz)
    index = np.stack([records.stack_indices(k, nz, context) for k in range(start, stop)])  # (n, C)
    return np.moveaxis(hu[index], 1, -1)


def grid_metadata(grid: geometry.Grid) -> dict:
    """The geometry a manifest keeps per scan (positions and directions only: nothing identifying)."""
    return {
        "origin_lps_mm": [float(v) for v in grid.origin],
        "row_dir": [float(v) for v in grid.row_dir],
        "col_dir": [float(v) for v in grid.col_dir],
    }


def scan_grid(meta: dict, shape: tuple[int, int, int]) -> geometry.Grid:
    """The grid of a manifest scan entry; shards built before the geometry was kept get origin 0 and
    axial directions (the voxel spacing is always right)."""
    return geometry.Grid(
        shape=tuple(int(s) for s in shape),
        spacing=tuple(float(s) for s in meta["spacing"]),
        origin=tuple(meta.get("origin_lps_mm", (0.0, 0.0, 0.0))),
        row_dir=tuple(meta.get("row_dir", (1.0, 0.0, 0.0))),
        col_dir=tuple(meta.get("col_dir", (0.0, 1.0, 0.0))),
    )
