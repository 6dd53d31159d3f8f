r"""Phantom and real CT side by side on the same figures: ``python -m data_prep.phantom.realism``.

  python -m data_prep.phantom.realism --real "$CALCJAX_REAL_DATA/coca-sample" --out docs/realism \
      [--phantoms 2] [--seed 0] [--size 512]

Four groups: real gated, phantom gated (``cardiac``), real chest, phantom chest. The real scans are read
with calcjax's own reader (``calcjax.data.scan_sources.dicom_scans``: COCA's XML labels where the release has
them) and are only measured, never copied into the phantom. Per scan, each figure below; per group, the
pooled figure: one JSON line per (group, figure) in ``OUT/realism.jsonl`` and one panel per figure in
``OUT/realism.png``.

- ``picture``: the slice at the heart's level (the calcium's mean z where the scan has labelled calcium,
  else the middle slice), mediastinal window W 400 / L 40 HU, whole field of view.
- ``hu_body``: HU inside the body (the largest 3D component of HU > -400, holes filled per slice):
  percentiles and the fractions in fat (-190..-30), soft tissue (-30..100) and >= 130 HU.
- ``hu_heart``: the same inside a disc of radius :data:`HEART_RADIUS_MM` around the body's in-plane centre
  on the heart-level slices (+-:data:`HEART_HALF_HEIGHT_MM`): a fixed rule, the same for every group.
- ``nps``: the noise power spectrum (``|FFT2(ROI - plane fit)|^2 dx dy / N^2``, radially averaged, in
  HU^2 mm^2 against cycles/mm) of the :data:`NPS_ROIS` most uniform :data:`NPS_ROI_PX` x :data:`NPS_ROI_PX`
  soft-tissue squares inside the body (mean -100..150 HU, no voxel >= 130 HU, lowest SD): noise SD,
  NPS-weighted mean frequency and peak frequency. White noise spreads its power to the Nyquist frequency;
  a scanner kernel's noise peaks at a lower frequency.
- ``bright``: 2D 8-connected components of HU >= 130 inside the body and outside the coronary labels, per
  slice (what a scorer must reject): components per slice, median area, and per slice those of
  >= 1 mm^2 (the ones Agatston would count). The real chest scans have no labels: their own coronary
  calcium is counted here too (a few components at most).
- ``lesions``: the reference lesions (``calcjax.core.agatston`` 2D lesions of the labels): count per scan,
  median and IQR of area (mm^2) and peak HU, the fraction with peak >= 400 HU.
- ``lesion_fat``: what a plaque sits in. For each 3D reference lesion (6-connected component of the
  labels), the fraction of fat (-190..-30 HU) among the unlabelled voxels of the slice through its
  centroid within :data:`LESION_FAT_RADII_MM` of it (in-plane discs); pooled: the median over lesions.
  A coronary in a thick fat groove reads near 1; one against myocardium, blood or the aortic root lower.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from scipy import ndimage
from tqdm import tqdm

from calcjax.core import agatston, metrics
from calcjax.data import scan_sources
from calcjax.data.input_pipeline import FAT_HU  # the fat band's one definition

BODY_HU = -400.0
SOFT_HU = (-30.0, 100.0)
HEART_RADIUS_MM = 50.0
HEART_HALF_HEIGHT_MM = 15.0
NPS_ROI_PX = 32
NPS_ROIS = 16
NPS_BINS = 24
LESION_FAT_RADII_MM = (5.0, 15.0)
WINDOW = (40.0, 400.0)  # level, width (HU)
HIST_EDGES = np.arange(-1024.0, 1601.0, 16.0)
GROUPS = ("real gated", "phantom gated", "real chest", "phantom chest")
_PLANAR_8 = np.zeros((3, 3, 3), bool)
_PLANAR_8[1] = True


def body_mask(hu: np.ndarray) -> np.ndarray:
    """``(z, y, x)`` bool: the largest 3D component of HU > -400, holes filled slice by slice."""
    above = hu > BODY_HU
    comp, n = ndimage.label(above)
    if n == 0:
        return above
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    body = comp == sizes.argmax()
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def heart_level(labels: np.ndarray | None, nz: int) -> int:
    """The slice at the heart's level: the mean z of labelled calcium, else the middle slice."""
    if labels is not None and labels.any():
        return int(round(np.nonzero(labels)[0].mean()))
    return nz // 2


def heart_region(body: np.ndarray, spacing, level: int) -> np.ndarray:
    """The disc of radius HEART_RADIUS_MM around the body's in-plane centre at ``level``, on the slices
    within HEART_HALF_HEIGHT_MM of it."""
    dz, dy, dx = spacing
    ys, xs = np.nonzero(body[level])
    cy, cx = (ys.mean(), xs.mean()) if ys.size else (body.shape[1] / 2, body.shape[2] / 2)
    yy, xx = np.mgrid[: body.shape[1], : body.shape[2]]
    disc = ((yy - cy) * dy) ** 2 + ((xx - cx) * dx) ** 2 <= HEART_RADIUS_MM**2
    out = np.zeros(body.shape, bool)
    half = int(round(HEART_HALF_HEIGHT_MM / dz))
    lo, hi = max(level - half, 0), min(level + half + 1, body.shape[0])
    out[lo:hi] = disc & body[lo:hi]
    return out


def hu_summary(values: np.ndarray) -> dict:
    """Percentiles and tissue fractions of HU values, and their histogram on HIST_EDGES (density)."""
    v = values.astype(np.float32)
    hist, _ = np.histogram(v, HIST_EDGES, density=True)
    return {
        "voxels": int(v.size),
        "p5": float(np.percentile(v, 5)),
        "p25": float(np.percentile(v, 25)),
        "median": float(np.median(v)),
        "p75": float(np.percentile(v, 75)),
        "p95": float(np.percentile(v, 95)),
        "fat_fraction": float(((v >= FAT_HU[0]) & (v < FAT_HU[1])).mean()),
        "soft_fraction": float(((v >= SOFT_HU[0]) & (v < SOFT_HU[1])).mean()),
        "calcium_fraction": float((v >= agatston.CALCIUM_THRESHOLD_HU).mean()),
        "histogram": [round(float(h), 7) for h in hist],
    }


def uniform_rois(hu: np.ndarray, body: np.ndarray) -> list[np.ndarray]:
    """The NPS_ROIS most uniform soft-tissue squares of the scan (module docstring), float64."""
    n = NPS_ROI_PX
    candidates = []
    for k in range(hu.shape[0]):
        for y in range(0, hu.shape[1] - n + 1, n // 2):
            for x in range(0, hu.shape[2] - n + 1, n // 2):
                if not body[k, y : y + n, x : x + n].all():
                    continue
                roi = hu[k, y : y + n, x : x + n]
                m = float(roi.mean())
                if -100.0 <= m <= 150.0 and roi.max() < agatston.CALCIUM_THRESHOLD_HU:
                    candidates.append((float(roi.std()), k, y, x))
    candidates.sort()
    return [hu[k, y : y + n, x : x + n].astype(np.float64) for _, k, y, x in candidates[:NPS_ROIS]]


def noise_power(rois: list[np.ndarray], dy: float, dx: float) -> dict:
    """Radially averaged NPS of the ROIs after a plane fit (module docstring); NaN figures without ROIs."""
    n = NPS_ROI_PX
    nyquist = 0.5 / max(dy, dx)
    if not rois:
        nan = float("nan")
        return {
            "rois": 0,
            "noise_sd_hu": nan,
            "mean_frequency_per_mm": nan,
            "peak_frequency_per_mm": nan,
            "nyquist_per_mm": float(nyquist),
            "frequency_per_mm": [],
            "nps_hu2_mm2": [],
        }
    yy, xx = np.mgrid[:n, :n]
    design = np.stack([np.ones(n * n), yy.ravel(), xx.ravel()], axis=1)
    spectra, sds = [], []
    for roi in rois:
        coef, *_ = np.linalg.lstsq(design, roi.ravel(), rcond=None)
        resid = roi - (design @ coef).reshape(n, n)
        sds.append(float(resid.std()))
        spectra.append(np.abs(np.fft.fft2(resid)) ** 2 * dy * dx / (n * n))
    nps = np.mean(spectra, axis=0)
    fy = np.fft.fftfreq(n, dy)[:, None]
    fx = np.fft.fftfreq(n, dx)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    edges = np.linspace(0.0, nyquist, NPS_BINS + 1)
    which = np.digitize(f.ravel(), edges) - 1
    ok = (which >= 0) & (which < NPS_BINS)
    radial = np.bincount(which[ok], weights=nps.ravel()[ok], minlength=NPS_BINS) / np.maximum(
        np.bincount(which[ok], minlength=NPS_BINS), 1
    )
    centres = (edges[:-1] + edges[1:]) / 2
    mean_f = float((radial * centres).sum() / radial.sum())
    return {
        "rois": len(rois),
        "noise_sd_hu": float(np.mean(sds)),
        "mean_frequency_per_mm": mean_f,
        "peak_frequency_per_mm": float(centres[int(radial[1:].argmax()) + 1]),
        "nyquist_per_mm": float(nyquist),
        "frequency_per_mm": [round(float(c), 4) for c in centres],
        "nps_hu2_mm2": [round(float(r), 4) for r in radial],
    }


def bright_components(hu: np.ndarray, labels: np.ndarray | None, body: np.ndarray, spacing) -> dict:
    """HU >= 130 components outside the coronary labels inside the body (module docstring)."""
    _, dy, dx = spacing
    mask = agatston.candidate_mask(hu) & body
    if labels is not None:
        mask &= labels == 0
    comp, n = ndimage.label(mask, structure=_PLANAR_8)
    areas = np.bincount(comp.ravel())[1:] * dy * dx
    return {
        "per_slice": float(n / hu.shape[0]),
        "per_slice_ge_1mm2": float((areas >= 1.0).sum() / hu.shape[0]),
        "median_area_mm2": float(np.median(areas)) if n else 0.0,
        "p90_area_mm2": float(np.percentile(areas, 90)) if n else 0.0,
        "areas_mm2": [round(float(a), 3) for a in areas],
    }


def lesion_fat(hu: np.ndarray, labels: np.ndarray, spacing) -> dict:
    """``{"fat_{r}mm": [fraction per 3D reference lesion]}`` for r in :data:`LESION_FAT_RADII_MM` (module
    docstring); ``hu``, ``labels`` ``(z, y, x)``, ``spacing`` (dz, dy, dx) mm."""
    out: dict[str, list[float]] = {f"fat_{r:g}mm": [] for r in LESION_FAT_RADII_MM}
    yy, xx = np.indices(hu.shape[1:], dtype=np.float32)
    for cz, cy, cx in metrics.lesion_centres(labels):
        z = int(round(cz))
        d_mm = np.hypot((yy - cy) * spacing[1], (xx - cx) * spacing[2])
        free = labels[z] == 0
        fat = (hu[z] >= FAT_HU[0]) & (hu[z] < FAT_HU[1])
        for r in LESION_FAT_RADII_MM:
            disc = (d_mm <= r) & free
            out[f"fat_{r:g}mm"].append(round(float(fat[disc].mean()), 4) if disc.any() else float("nan"))
    return out


def lesion_summary(lesions: list[dict]) -> dict:
    """Count, area and peak-HU distribution of reference 2D lesions (counted ones)."""
    area = np.array([l_["area_mm2"] for l_ in lesions if l_["counted"]], float)
    peak = np.array([l_["peak_hu"] for l_ in lesions if l_["counted"]], float)
    if area.size == 0:
        return {"lesions": 0, "area_mm2": [], "peak_hu": []}
    return {
        "lesions": int(area.size),
        "median_area_mm2": float(np.median(area)),
        "iqr_area_mm2": [float(np.percentile(area, 25)), float(np.percentile(area, 75))],
        "median_peak_hu": float(np.median(peak)),
        "iqr_peak_hu": [float(np.percentile(peak, 25)), float(np.percentile(peak, 75))],
        "peak_ge_400_fraction": float((peak >= 400).mean()),
        "area_mm2": [round(float(a), 3) for a in area],
        "peak_hu": [round(float(p), 1) for p in peak],
    }


def measure_scan(hu: np.ndarray, labels: np.ndarray | None, spacing) -> dict:
    """Every figure of one scan (module docstring); ``hu`` ``(z, y, x)``, ``spacing`` (dz, dy, dx) mm."""
    body = body_mask(hu)
    level = heart_level(labels, hu.shape[0])
    heart = heart_region(body, spacing, level)
    lesions = agatston.score(hu, labels, spacing)["lesions"] if labels is not None else []
    return {
        "slices": int(hu.shape[0]),
        "pixel_mm": float(spacing[1]),
        "level": level,
        "picture": hu[level],
        "hu_body": hu_summary(hu[body]),
        "hu_heart": hu_summary(hu[heart]),
        "nps": noise_power(uniform_rois(hu, body), spacing[1], spacing[2]),
        "bright": bright_components(hu, labels, body, spacing),
        "lesions": lesion_summary(lesions) if labels is not None else None,
        "lesion_fat": lesion_fat(hu, labels, spacing) if labels is not None else None,
    }


def _pool(measures: list[dict]) -> dict:
    """One group's figures from its scans' (HU summaries: voxel-weighted histograms averaged per scan)."""
    out: dict = {"scans": len(measures)}
    for key in ("hu_body", "hu_heart"):
        out[key] = {
            k: float(np.mean([m[key][k] for m in measures]))
            for k in ("median", "p5", "p95", "fat_fraction", "soft_fraction", "calcium_fraction")
        }
        out[key]["histogram"] = np.mean([m[key]["histogram"] for m in measures], axis=0).tolist()
    out["nps"] = {
        k: float(np.nanmean([m["nps"][k] for m in measures]))
        if any(m["nps"]["rois"] for m in measures)
        else None
        for k in ("noise_sd_hu", "mean_frequency_per_mm", "peak_frequency_per_mm")
    }
    out["nps"]["curves"] = [(m["nps"]["frequency_per_mm"], m["nps"]["nps_hu2_mm2"]) for m in measures]
    areas = np.concatenate([m["bright"]["areas_mm2"] for m in measures] or [[]])
    out["bright"] = {
        "per_slice": float(np.mean([m["bright"]["per_slice"] for m in measures])),
        "per_slice_ge_1mm2": float(np.mean([m["bright"]["per_slice_ge_1mm2"] for m in measures])),
        "median_area_mm2": float(np.median(areas)) if areas.size else 0.0,
        "areas_mm2": areas.tolist(),
    }
    les = [m["lesions"] for m in measures if m["lesions"] is not None]
    if les:
        area = np.concatenate([lz["area_mm2"] for lz in les] or [[]])
        peak = np.concatenate([lz["peak_hu"] for lz in les] or [[]])
        out["lesions"] = {
            "per_scan": float(np.mean([lz["lesions"] for lz in les])),
            "median_area_mm2": float(np.median(area)) if area.size else None,
            "median_peak_hu": float(np.median(peak)) if peak.size else None,
            "peak_ge_400_fraction": float((peak >= 400).mean()) if peak.size else None,
            "area_mm2": area.tolist(),
            "peak_hu": peak.tolist(),
        }
        fats = [m["lesion_fat"] for m in measures if m["lesion_fat"] is not None]
        out["lesion_fat"] = {"lesions": int(sum(len(f["fat_5mm"]) for f in fats))}
        for r in LESION_FAT_RADII_MM:
            values = np.array([v for f in fats for v in f[f"fat_{r:g}mm"]], float)
            values = values[np.isfinite(values)]
            out["lesion_fat"][f"median_fat_{r:g}mm"] = float(np.median(values)) if values.size else None
    return out


def real_scans(root: str) -> dict[str, list[tuple]]:
    """``{"real gated": [(hu, labels, spacing)], "real chest": [...]}`` of the CT series under ``root``."""
    scans, _ = scan_sources.dicom_scans(root, context=0, salt="realism-measurement")
    out: dict[str, list[tuple]] = {"real gated": [], "real chest": []}
    for s in tqdm(scans, desc="real scans", unit="scan"):
        loaded = s.load()
        group = "real gated" if loaded.meta.get("protocol") == "cardiac" else "real chest"
        out[group].append((loaded.hu, loaded.labels, loaded.grid.spacing))
    return out


def phantom_scans(count: int, seed: int, size: int, version: int = 1) -> dict[str, list[tuple]]:
    """``count`` phantom scans per protocol, generated in memory (``data_prep.phantom.generator``, its
    ``version``)."""
    from data_prep.phantom.generator import generate_scan

    out: dict[str, list[tuple]] = {"phantom gated": [], "phantom chest": []}
    for i in tqdm(range(2 * count), desc="phantom scans", unit="scan"):
        protocol = "cardiac" if i % 2 == 0 else "chest"
        scan = generate_scan(seed, i, protocol, size=size, target_category=2 + (i // 2) % 3, version=version)
        group = "phantom gated" if protocol == "cardiac" else "phantom chest"
        out[group].append((scan.hu, scan.label, scan.grid.spacing))
    return out


def measure(groups: dict[str, list[tuple]]) -> dict[str, dict]:
    """Per group: the pooled figures and the per-scan measures (module docstring)."""
    out = {}
    for name in GROUPS:
        measures = [measure_scan(hu, lab, sp) for hu, lab, sp in groups.get(name, [])]
        if measures:
            out[name] = {"pooled": _pool(measures), "scans": measures}
    return out


def write_jsonl(result: dict[str, dict], path: str) -> None:
    """One line per (group, figure): the pooled numbers (long lists left out)."""
    skip = {"histogram", "curves", "areas_mm2", "peak_hu", "area_mm2"}
    lines = []
    for group, r in result.items():
        for figure, values in r["pooled"].items():
            if isinstance(values, dict):
                lines.append(
                    {"group": group, "figure": figure, **{k: v for k, v in values.items() if k not in skip}}
                )
            else:
                lines.append({"group": group, "figure": figure, "value": values})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(tmp, path)


def plot(result: dict[str, dict], path: str) -> None:
    """The picture row and the figure panels (module docstring) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "real gated": "k",
        "phantom gated": "tab:red",
        "real chest": "tab:blue",
        "phantom chest": "tab:orange",
    }
    fig, axes = plt.subplots(2, 4, figsize=(18, 9.5))
    level, width = WINDOW
    for ax, group in zip(axes[0], GROUPS, strict=True):
        ax.axis("off")
        if group not in result:
            continue
        m = result[group]["scans"][0]
        ax.imshow(m["picture"], cmap="gray", vmin=level - width / 2, vmax=level + width / 2)
        ax.set_title(f"{group}: slice {m['level']}, {m['pixel_mm']:.2f} mm px, W{width:.0f}/L{level:.0f}")
    centres = (HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2
    ax_body, ax_heart, ax_nps, ax_les = axes[1]
    for group, r in result.items():
        p, c = r["pooled"], colours[group]
        ax_body.semilogy(centres, np.maximum(p["hu_body"]["histogram"], 1e-7), color=c, label=group)
        ax_heart.semilogy(centres, np.maximum(p["hu_heart"]["histogram"], 1e-7), color=c, label=group)
        for f, nps in p["nps"]["curves"]:
            ax_nps.semilogy(
                f,
                np.maximum(nps, 1e-3),
                color=c,
                alpha=0.7,
                label=group if f is p["nps"]["curves"][0][0] else None,
            )
        if "lesions" in p and p["lesions"]["area_mm2"]:
            ax_les.scatter(
                p["lesions"]["area_mm2"], p["lesions"]["peak_hu"], s=8, color=c, alpha=0.6, label=group
            )
    ax_body.set(title="HU inside the body", xlabel="HU", ylabel="density", xlim=(-1024, 1600))
    ax_heart.set(title=f"HU around the heart (r {HEART_RADIUS_MM:.0f} mm)", xlabel="HU", xlim=(-1024, 1600))
    ax_nps.set(title="noise power spectrum (uniform soft tissue)", xlabel="cycles/mm", ylabel="HU^2 mm^2")
    ax_les.set(title="reference lesions", xlabel="area (mm^2)", ylabel="peak HU", xscale="log")
    for ax in axes[1]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


_REAL = flags.DEFINE_string(
    "real", None, "Folder of real CT (e.g. $CALCJAX_REAL_DATA/coca-sample).", required=True
)
_OUT = flags.DEFINE_string("out", "docs/realism", "Output folder (realism.png, realism.jsonl).")
_PHANTOMS = flags.DEFINE_integer("phantoms", 2, "Phantom scans per protocol.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Phantom seed.")
_SIZE = flags.DEFINE_integer("size", 512, "Phantom matrix size.")
_VERSION = flags.DEFINE_integer("phantom_version", 1, "Phantom generator version (1-4).")


def main(argv):
    del argv
    groups = {
        **real_scans(_REAL.value),
        **phantom_scans(_PHANTOMS.value, _SEED.value, _SIZE.value, _VERSION.value),
    }
    result = measure(groups)
    os.makedirs(_OUT.value, exist_ok=True)
    write_jsonl(result, os.path.join(_OUT.value, "realism.jsonl"))
    plot(result, os.path.join(_OUT.value, "realism.png"))
    header = f"{'group':14} {'body med':>8} {'heart fat':>9} {'noise SD':>8} {'NPS mean f':>10} "
    header += f"{'bright/sl':>9} {'>=1mm2/sl':>9} {'lesions':>7} {'les area':>8} {'les peak':>8} "
    header += f"{'fat 5mm':>7} {'fat 15mm':>8}"
    print(header)
    for group, r in result.items():
        p = r["pooled"]
        les = p.get("lesions") or {}
        fat = p.get("lesion_fat") or {}

        def num(v):
            return float("nan") if v is None else v

        print(
            f"{group:14} {p['hu_body']['median']:8.0f} {p['hu_heart']['fat_fraction']:9.3f} "
            f"{num(p['nps']['noise_sd_hu']):8.1f} {num(p['nps']['mean_frequency_per_mm']):10.3f} "
            f"{p['bright']['per_slice']:9.2f} {p['bright']['per_slice_ge_1mm2']:9.2f} "
            f"{num(les.get('per_scan')):7.1f} {num(les.get('median_area_mm2')):8.2f} "
            f"{num(les.get('median_peak_hu')):8.0f} {num(fat.get('median_fat_5mm')):7.2f} "
            f"{num(fat.get('median_fat_15mm')):8.2f}"
        )
    print(f"-> {os.path.join(_OUT.value, 'realism.png')}, {os.path.join(_OUT.value, 'realism.jsonl')}")


if __name__ == "__main__":
    app.run(main)
