"""PNG preview of phantom scans: a few axial slices with the coronary calcium outlined per artery."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ARTERY_COLOURS = {1: "#ffd92f", 2: "#e41a1c", 3: "#4daf4a", 4: "#377eb8"}
ARTERY_NAMES = {1: "LM", 2: "LAD", 3: "LCX", 4: "RCA"}
WINDOW_LEVEL_HU, WINDOW_WIDTH_HU = 40.0, 600.0


def pick_slices(label: np.ndarray, count: int) -> list[int]:
    """Slices with the most calcium voxels (spread out, ascending); the mid slice when there is none."""
    per_slice = (label > 0).sum(axis=(1, 2))
    order = [int(k) for k in np.argsort(-per_slice, kind="stable") if per_slice[k] > 0]
    chosen: list[int] = []
    for k in order:
        if all(abs(k - c) > 2 for c in chosen):
            chosen.append(k)
        if len(chosen) == count:
            break
    return sorted(chosen) or [label.shape[0] // 2]


def write_preview(path: str, scans: list, slices_per_scan: int = 3) -> None:
    """Writes a grid of slices (rows = scans) with calcium outlines to ``path`` (PNG)."""
    rows = len(scans)
    fig, axes = plt.subplots(rows, slices_per_scan, figsize=(4 * slices_per_scan, 4.2 * rows), squeeze=False)
    lo, hi = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2, WINDOW_LEVEL_HU + WINDOW_WIDTH_HU / 2
    for r, scan in enumerate(scans):
        picks = pick_slices(scan.label, slices_per_scan)
        for c in range(slices_per_scan):
            ax = axes[r, c]
            ax.set_axis_off()
            if c >= len(picks):
                continue
            k = picks[c]
            ax.imshow(scan.hu[k], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            for value, colour in ARTERY_COLOURS.items():
                m = scan.label[k] == value
                if m.any():
                    ax.contour(m.astype(float), levels=[0.5], colors=colour, linewidths=0.8)
            acq = scan.acquisition
            present = sorted({ARTERY_NAMES[v] for v in np.unique(scan.label[k]) if v})
            z_mm = scan.grid.slice_position(k)[2]
            ax.set_title(
                f"{acq.protocol} {acq.thickness_mm:g}/{acq.increment_mm:g} mm, z={z_mm:.0f} mm"
                f"\n{', '.join(present) or 'no calcium'}; Agatston {scan.truth['reference']['agatston']:.0f}",
                fontsize=8,
            )
    fig.suptitle(
        f"calcjax phantom (window L{WINDOW_LEVEL_HU:g}/W{WINDOW_WIDTH_HU:g} HU); "
        "outlines: LM yellow, LAD red, LCX green, RCA blue",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
