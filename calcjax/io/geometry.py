"""Voxel grids of axial CT volumes and their mapping to patient coordinates.

Conventions:
- volumes are indexed ``(z, y, x)`` = (slice, row, column); z ascends along the slice normal;
- ``spacing`` is ``(dz, dy, dx)`` in mm, with dz the slice *increment* (difference of positions), not
  the SliceThickness tag; dy is the distance between rows and dx between columns (DICOM PixelSpacing
  is ``[dy, dx]``);
- world coordinates are DICOM patient coordinates, LPS (x to the patient's left, y to posterior,
  z to superior), in mm; NIfTI affines are RAS, so ``affine_ras = diag(-1, -1, 1, 1) @ affine_lps``.

No jax here: this module is imported by light reader and writer processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class Grid:
    """An axial voxel grid.

    Attributes:
      shape: ``(nz, ny, nx)`` voxels.
      spacing: ``(dz, dy, dx)`` in mm.
      origin: LPS position in mm of the centre of voxel ``(0, 0, 0)`` (ImagePositionPatient of slice 0).
      row_dir: unit LPS vector along a row (as the column index x grows); IOP[0:3].
      col_dir: unit LPS vector down a column (as the row index y grows); IOP[3:6].
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    row_dir: tuple[float, float, float] = (1.0, 0.0, 0.0)
    col_dir: tuple[float, float, float] = (0.0, 1.0, 0.0)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row_dir x col_dir): the direction z ascends in."""
        return np.cross(self.row_dir, self.col_dir)

    def affine_lps(self) -> np.ndarray:
        """4x4 affine mapping voxel ``(x, y, z)`` indices (column, row, slice) to LPS mm."""
        dz, dy, dx = self.spacing
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.row_dir) * dx
        a[:3, 1] = np.asarray(self.col_dir) * dy
        a[:3, 2] = self.normal * dz
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """4x4 NIfTI affine mapping voxel ``(x, y, z)`` indices to RAS mm."""
        return LPS_TO_RAS @ self.affine_lps()

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient (LPS mm) of slice ``k``."""
        return np.asarray(self.origin) + self.normal * self.spacing[0] * k

    def index_to_lps(self, zyx: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` voxel indices ordered ``(z, y, x)`` to ``(..., 3)`` LPS mm."""
        zyx = np.asarray(zyx, dtype=np.float64)
        xyz1 = np.concatenate([zyx[..., ::-1], np.ones(zyx.shape[:-1] + (1,))], axis=-1)
        return (xyz1 @ self.affine_lps().T)[..., :3]

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` LPS mm to fractional voxel indices ordered ``(z, y, x)``."""
        lps = np.asarray(lps, dtype=np.float64)
        p1 = np.concatenate([lps, np.ones(lps.shape[:-1] + (1,))], axis=-1)
        return (p1 @ np.linalg.inv(self.affine_lps()).T)[..., 2::-1]
