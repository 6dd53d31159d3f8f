"""The evaluation report of a scoring run: ``OUT/report.md`` and PNG figures in ``OUT/figures/``.

Input: the rows of ``OUT/scores.jsonl`` (``calcjax.score.score_row``); only rows with reference labels
(an ``evaluation`` entry) count. Every figure comes from ``calcjax.metrics.evaluate`` over the rows'
:class:`calcjax.metrics.ScanSummary` values, for all scans and per protocol, with bootstrap CIs:

- table of voxel, lesion, Agatston-agreement and risk-category figures;
- ``figures/bland_altman.png``: Bland-Altman of predicted vs reference Agatston (all scans, per protocol
  marker), with the mean difference and the 95% limits of agreement;
- ``figures/risk_confusion.png``: the 5x5 risk-category confusion matrix (reference rows, predicted columns);
- ``figures/overlays.png``: prediction vs reference on the slices with the largest disagreement (the
  crops the scorer keeps in ``OUT/overlays/``), HU window [-200, 800].

- ``report.json``: the ``calcjax.metrics.evaluate`` results the tables are printed from.

Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from calcjax import agatston, metrics  # noqa: E402

TABLE = (
    ("voxel_precision", "Voxel precision"),
    ("voxel_recall", "Voxel recall"),
    ("voxel_f1", "Voxel F1"),
    ("voxel_f1_LM", "Voxel F1, LM"),
    ("voxel_f1_LAD", "Voxel F1, LAD"),
    ("voxel_f1_LCX", "Voxel F1, LCX"),
    ("voxel_f1_RCA", "Voxel F1, RCA"),
    ("lesion_sensitivity", "Lesion sensitivity"),
    ("lesion_ppv", "Lesion PPV"),
    ("lesion_f1", "Lesion F1"),
    ("fp_lesions_per_scan", "False-positive lesions / scan"),
    ("agatston_icc", "Agatston ICC(2,1)"),
    ("bland_altman_mean_difference", "Agatston mean difference (pred - ref)"),
    ("bland_altman_lower_limit", "Lower limit of agreement"),
    ("bland_altman_upper_limit", "Upper limit of agreement"),
    ("risk_accuracy", "Risk category accuracy"),
    ("risk_kappa", "Risk category linear weighted kappa"),
)
NUM_OVERLAYS = 6
COLOURS = np.array(
    [[0, 0, 0, 0], [1, 0.9, 0, 1], [1, 0.2, 0.2, 1], [0.2, 1, 0.3, 1], [0.2, 0.6, 1, 1]], dtype=float
)  # background clear, LM yellow, LAD red, LCX green, RCA blue (as the phantom preview)


def summaries_of(rows: list[dict]) -> list[metrics.ScanSummary]:
    """The :class:`ScanSummary` of every row with an ``evaluation`` entry."""
    out = []
    for r in rows:
        ev = r.get("evaluation")
        if ev is None:
            continue
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in ev.items()}
        out.append(metrics.ScanSummary(scan_id=r["scan_id"], protocol=r["protocol"], **fields))
    return out


def format_figure(fig: dict) -> str:
    v, lo, hi = fig["value"], fig["ci_low"], fig["ci_high"]
    if not np.isfinite(v):
        return "n/a"
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{v:.3f} ({lo:.3f} to {hi:.3f})"
    return f"{v:.3f}"


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def bland_altman_figure(rows: list[dict], path: str) -> None:
    pred = np.array([r["agatston"] for r in rows], float)
    ref = np.array([r["reference_agatston"] for r in rows], float)
    ba = metrics.bland_altman(pred, ref)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    mean, diff = (pred + ref) / 2, pred - ref
    for protocol, marker in (("cardiac", "o"), ("chest", "s"), ("unknown", "^")):
        sel = np.array([r["protocol"] == protocol for r in rows])
        if sel.any():
            ax.scatter(mean[sel], diff[sel], marker=marker, alpha=0.7, label=protocol)
    for key, style in (("mean_difference", "-"), ("lower_limit", "--"), ("upper_limit", "--")):
        v = ba.get(key)
        if v is not None and np.isfinite(v):
            ax.axhline(v, color="k", linestyle=style, linewidth=1)
    ax.set_xlabel("mean of predicted and reference Agatston")
    ax.set_ylabel("predicted - reference Agatston")
    ax.set_title(f"Bland-Altman, {len(rows)} scans")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def confusion_figure(confusion: list[list[int]], path: str) -> None:
    c = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(c, cmap="Blues")
    names = ["0", "I", "II", "III", "IV"]
    ax.set_xticks(range(5), names)
    ax.set_yticks(range(5), names)
    ax.set_xlabel("predicted risk category")
    ax.set_ylabel("reference risk category")
    for i in range(5):
        for j in range(5):
            ax.text(j, i, str(c[i, j]), ha="center", va="center", color="k" if c[i, j] < c.max() / 2 else "w")
    ax.set_title("Risk categories")
    _save(fig, path)


def overlay_figure(out: str, rows: list[dict], path: str) -> int:
    """Reference | prediction on the ``NUM_OVERLAYS`` worst slices; returns how many were drawn."""
    worst = sorted(
        (r for r in rows if r.get("worst_slice_disagreement")),
        key=lambda r: r["worst_slice_disagreement"],
        reverse=True,
    )
    crops = []
    for r in worst:
        f = os.path.join(out, "overlays", f"{r['scan_id']}.npz")
        if os.path.isfile(f):
            with np.load(f) as z:
                crops.append((r, {k: z[k] for k in ("hu", "pred", "ref")}))
        if len(crops) == NUM_OVERLAYS:
            break
    if not crops:
        return 0
    fig, axes = plt.subplots(len(crops), 2, figsize=(5, 2.5 * len(crops)), squeeze=False)
    for (r, c), row_axes in zip(crops, axes, strict=True):
        for ax, key, title in zip(row_axes, ("ref", "pred"), ("reference", "prediction"), strict=True):
            ax.imshow(np.clip(c["hu"], -200, 800), cmap="gray", vmin=-200, vmax=800)
            ax.imshow(COLOURS[np.clip(c[key], 0, 4)], interpolation="nearest", alpha=0.6)
            ax.set_title(f"{r['scan_id'][:13]} z={r['worst_slice']}: {title}", fontsize=7)
            ax.axis("off")
    fig.suptitle("Largest disagreements (LM yellow, LAD red, LCX green, RCA blue)", fontsize=8)
    _save(fig, path)
    return len(crops)


def write_report(out: str, rows: list[dict], *, checkpoint: str = "", num_bootstrap: int = 1000) -> str:
    """Writes ``out/report.md`` and ``out/figures/*.png`` from scored rows; returns the report path."""
    labelled = [r for r in rows if "evaluation" in r]
    summaries = summaries_of(labelled)
    results = metrics.evaluate(summaries, num_bootstrap=num_bootstrap)
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    bland_altman_figure(labelled, os.path.join(fig_dir, "bland_altman.png"))
    confusion_figure(results["all"]["risk_confusion"], os.path.join(fig_dir, "risk_confusion.png"))
    n_overlays = overlay_figure(out, labelled, os.path.join(fig_dir, "overlays.png"))

    groups = list(results)
    lines = [
        "# calcjax scoring report",
        "",
        f"Checkpoint: `{checkpoint}`. Scans scored: {len(rows)}; with reference labels: {len(labelled)} ("
        + ", ".join(f"{g}: {results[g]['num_scans']}" for g in groups if g != "all")
        + ").",
        "",
        "Calcium = predicted (or reference) coronary label AND HU >= 130; Agatston per DESIGN.md. "
        f"Figures: value (95% bootstrap CI, {num_bootstrap} resamples of scans).",
        "",
        "| Figure | " + " | ".join(f"{g} (n={results[g]['num_scans']})" for g in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for key, name in TABLE:
        cells = [
            format_figure(results[g]["figures"][key]) if key in results[g]["figures"] else "n/a"
            for g in groups
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"{g}: {results[g]['ci_note']}" for g in groups if results[g].get("ci_note")]
    if notes:
        lines += ["", "CI notes: " + "; ".join(notes) + "."]
    lines += [
        "",
        "## Risk categories (all scans; rows reference, columns predicted)",
        "",
        "| ref \\ pred | " + " | ".join(agatston.RISK_CATEGORY_NAMES) + " |",
        "|---|" + "---|" * 5,
    ]
    for i, row in enumerate(results["all"]["risk_confusion"]):
        lines.append(f"| {agatston.RISK_CATEGORY_NAMES[i]} | " + " | ".join(str(v) for v in row) + " |")
    lines += [
        "",
        "## Figures",
        "",
        "![Bland-Altman](figures/bland_altman.png)",
        "",
        "![Risk confusion](figures/risk_confusion.png)",
        "",
    ]
    if n_overlays:
        lines += ["![Largest disagreements](figures/overlays.png)", ""]
    lines += [
        "## Per scan",
        "",
        "| scan | protocol | slices | Agatston pred | Agatston ref | category pred | category ref |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in labelled:
        lines.append(
            f"| {r['scan_id']} | {r['protocol']} | {r['num_slices']} | {r['agatston']:.1f} | "
            f"{r['reference_agatston']:.1f} | {r['risk_category']} | {r['reference_risk_category']} |"
        )
    with open(os.path.join(out, "report.json.tmp"), "w") as f:
        json.dump({"checkpoint": checkpoint, "num_bootstrap": num_bootstrap, "results": results}, f, indent=1)
    os.replace(os.path.join(out, "report.json.tmp"), os.path.join(out, "report.json"))
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path
