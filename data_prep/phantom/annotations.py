"""Ground truth files of a phantom scan: NIfTI label volume and COCA-style OsiriX plist ROIs.

- ``label.nii.gz``: uint8 labels (0 background, 1 LM, 2 LAD, 3 LCX, 4 RCA) stored with NIfTI axes
  ``(i, j, k) = (column, row, slice)`` and an RAS affine derived from the DICOM geometry
  (``Grid.affine_ras``: LPS -> RAS flips x and y), voxel for voxel on the image grid.
- ``calcium.xml``: an Apple plist as the COCA release writes it (Stanford AIMI): ``Images`` -> per slice
  ``ImageIndex`` (0-based, ascending z), ``NumberOfROIs``, ``ROIs`` -> ``Name`` (COCA's artery names),
  ``Point_px`` as ``"(x, y)"`` strings (pixel centres at integer coordinates), ``Point_mm`` as
  ``"(x, y, z)"`` LPS strings, ``NumberOfPoints``, ``Area`` (cm^2), ``Min``/``Max``/``Mean``/``Dev`` (HU),
  ``Center`` and ``Type`` 20. Each ROI is the pixel-edge outline of one 4-connected piece of one artery's
  label on one slice, with holes filled, so its vertices lie on half-integer coordinates and a
  point-in-polygon test of pixel centres gives that piece back exactly.
"""

from __future__ import annotations

import plistlib

import numpy as np
from scipy import ndimage

from calcjax.io.geometry import Grid

COCA_NAMES = {
    1: "Left Coronary Artery",
    2: "Left Anterior Descending Artery",
    3: "Left Circumflex Artery",
    4: "Right Coronary Artery",
}


def outline_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Pixel-edge outlines of a 2D mask as closed loops of ``(x, y)`` vertices at half-integers.

    The outline follows pixel edges with the inside on the right (image coordinates, y down); at a
    vertex where two pieces touch diagonally it turns right, so every loop is a simple polygon. Holes
    are not traced (fill them first). Collinear vertices are dropped.
    """
    m = np.pad(mask.astype(bool), 1)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    rows, cols = np.nonzero(m)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        # Vertex (i, j) is the corner at x = i - 0.5, y = j - 0.5 in the padded image.
        if not m[r - 1, c]:
            out.setdefault((c, r), []).append((c + 1, r))
        if not m[r, c + 1]:
            out.setdefault((c + 1, r), []).append((c + 1, r + 1))
        if not m[r + 1, c]:
            out.setdefault((c + 1, r + 1), []).append((c, r + 1))
        if not m[r, c - 1]:
            out.setdefault((c, r + 1), []).append((c, r))
    loops = []
    while out:
        # Start where there is one way out (every loop has a convex corner): the loop closes there.
        start = next((v for v, o in out.items() if len(o) == 1), next(iter(out)))
        loop, cur, prev_dir = [], start, None
        while True:
            loop.append(cur)
            options = out[cur]
            nxt = options[0]
            if len(options) > 1 and prev_dir is not None:
                right = (-prev_dir[1], prev_dir[0])
                nxt = next((o for o in options if (o[0] - cur[0], o[1] - cur[1]) == right), nxt)
            options.remove(nxt)
            if not options:
                del out[cur]
            prev_dir = (nxt[0] - cur[0], nxt[1] - cur[1])
            cur = nxt
            if cur == start:
                break
        pts = np.asarray(loop, dtype=np.float64) - 1.5  # undo the padding, move to pixel corners
        loops.append(_drop_collinear(pts))
    return loops


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - pts[:, 0]
    )
    return pts[cross != 0]


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def coca_plist(label: np.ndarray, hu: np.ndarray, grid: Grid) -> dict:
    """COCA-style plist dict of the coronary ROIs of ``label`` ``(z, y, x)`` (see module docstring)."""
    dz, dy, dx = grid.spacing
    row_dir, col_dir = np.asarray(grid.row_dir), np.asarray(grid.col_dir)
    images = []
    for k in np.unique(np.nonzero(label)[0]).tolist():
        ipp = grid.slice_position(k)
        rois = []
        for value in range(1, 5):
            pieces, n = ndimage.label(label[k] == value)
            for piece in range(1, n + 1):
                filled = ndimage.binary_fill_holes(pieces == piece)
                pix = hu[k][filled]
                for loop in outline_loops(filled):
                    mm = ipp + loop[:, :1] * dx * row_dir + loop[:, 1:] * dy * col_dir
                    area_px = _polygon_area(loop)
                    centre = mm.mean(axis=0)
                    rois.append(
                        {
                            "Name": COCA_NAMES[value],
                            "Type": 20,
                            "NumberOfPoints": int(len(loop)),
                            "Point_px": [f"({x:.6f}, {y:.6f})" for x, y in loop],
                            "Point_mm": [f"({p[0]:.6f}, {p[1]:.6f}, {p[2]:.6f})" for p in mm],
                            "Area": float(area_px * dx * dy / 100.0),
                            "Center": f"({centre[0]:.6f}, {centre[1]:.6f}, {centre[2]:.6f})",
                            "Min": float(pix.min()),
                            "Max": float(pix.max()),
                            "Mean": float(pix.mean()),
                            "Dev": float(pix.std()),
                        }
                    )
        images.append({"ImageIndex": int(k), "NumberOfROIs": len(rois), "ROIs": rois})
    return {"Images": images}


def write_coca_xml(path: str, label: np.ndarray, hu: np.ndarray, grid: Grid) -> None:
    with open(path, "wb") as f:
        plistlib.dump(coca_plist(label, hu, grid), f, fmt=plistlib.FMT_XML)
