"""The evaluation report of a scoring run: ``OUT/report.md`` and PNG figures in ``OUT/figures/``.

Input: the rows of ``OUT/scores.jsonl`` (``calcjax.score.rows.score_row``). Voxel and lesion figures come from
``calcjax.core.metrics.evaluate`` over the rows with reference labels (an ``evaluation`` entry); Agatston and
risk-category agreement from ``calcjax.core.metrics.evaluate_scores`` over every row with a reference Agatston
(labels or a sheet of scan-level scores). For all scans and per protocol, with bootstrap CIs:

- table of voxel, lesion, Agatston-agreement and risk-category figures;
- ``figures/bland_altman.png``: Bland-Altman of predicted vs reference Agatston (all scans, per protocol
  marker), with the mean difference and the 95% limits of agreement;
- ``figures/risk_confusion.png``: the 5x5 risk-category confusion matrix (reference rows, predicted columns);
- ``figures/overlays.png``: prediction vs reference around the largest missed, extra and wrong-artery
  components (the crops the scorer keeps in ``OUT/overlays/``), HU window [-200, 800].

- ``report.json``: the ``calcjax.core.metrics.evaluate`` results the tables are printed from.

Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from calcjax.core import agatston, metrics  # noqa: E402
from calcjax.io.atomic import write_atomic  # noqa: E402

SEGMENTATION_TABLE = (  # scans with reference masks only
    ("voxel_precision", "Voxel precision"),
    ("voxel_recall", "Voxel recall"),
    ("voxel_f1", "Voxel F1"),
    ("voxel_f1_LM", "Voxel F1, LM"),
    ("voxel_f1_LAD", "Voxel F1, LAD"),
    ("voxel_f1_LCX", "Voxel F1, LCX"),
    ("voxel_f1_RCA", "Voxel F1, RCA"),
    ("voxel_f1_artery", "Voxel F1, artery-aware"),
    ("lesion_sensitivity", "Lesion sensitivity"),
    ("lesion_ppv", "Lesion PPV"),
    ("lesion_f1", "Lesion F1"),
    ("fp_lesions_per_scan", "False-positive lesions / scan"),
)
AGREEMENT_TABLE = (  # every scan with a reference Agatston (mask or sheet)
    ("agatston_icc", "Agatston ICC(2,1)"),
    ("bland_altman_mean_difference", "Agatston mean difference (pred - ref)"),
    ("bland_altman_lower_limit", "Lower limit of agreement"),
    ("bland_altman_upper_limit", "Upper limit of agreement"),
    ("risk_accuracy", "Risk category accuracy"),
    ("risk_kappa", "Risk category linear weighted kappa"),
)
TABLE = SEGMENTATION_TABLE + AGREEMENT_TABLE
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
        out.append(metrics.ScanSummary.from_counts(ev, r["scan_id"], r["protocol"]))
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
    """Reference | prediction crops of the ``NUM_OVERLAYS`` largest disagreement components over all
    scans (each crop centred on one missed, extra or wrong-artery component:
    ``score_rows.disagreement_crops``); returns how many were drawn."""
    panels = [
        (d["voxels"], r, i, d)
        for r in rows
        for i, d in enumerate(r.get("disagreements") or [])
        if os.path.isfile(os.path.join(out, "overlays", f"{r['scan_id']}.npz"))
    ]
    panels.sort(key=lambda p: -p[0])
    panels = panels[:NUM_OVERLAYS]
    if not panels:
        return 0
    fig, axes = plt.subplots(
        len(panels), 2, figsize=(5, 2.5 * len(panels)), squeeze=False, layout="constrained"
    )
    for (_, r, i, d), row_axes in zip(panels, axes, strict=True):
        with np.load(os.path.join(out, "overlays", f"{r['scan_id']}.npz")) as z:
            c = {k: z[f"{i}_{k}"] for k in ("hu", "pred", "ref")}
        for ax, key, title in zip(row_axes, ("ref", "pred"), ("reference", "prediction"), strict=True):
            ax.imshow(np.clip(c["hu"], -200, 800), cmap="gray", vmin=-200, vmax=800)
            ax.imshow(COLOURS[np.clip(c[key], 0, 4)], interpolation="nearest", alpha=0.6)
            ax.set_title(
                f"{r['scan_id'][:13]} z={d['slice']} {d['kind']} ({d['voxels']} vx): {title}", fontsize=6
            )
            ax.axis("off")
    fig.suptitle("Largest disagreements (LM yellow, LAD red, LCX green, RCA blue)", fontsize=8)
    _save(fig, path)
    return len(panels)


def score_summaries_of(rows: list[dict]) -> list[metrics.ScoreSummary]:
    """The scan-level :class:`ScoreSummary` of every row with a reference Agatston (mask or sheet)."""
    return [
        metrics.ScoreSummary(
            scan_id=r["scan_id"],
            protocol=r["protocol"],
            agatston_pred=float(r["agatston"]),
            agatston_ref=float(r["reference_agatston"]),
            category_pred=int(r["risk_category"]),
            category_ref=int(r["reference_risk_category"]),
        )
        for r in rows
        if r.get("reference_agatston") is not None
    ]


def _table(results: dict, table, groups: list[str]) -> list[str]:
    lines = [
        "| Figure | " + " | ".join(f"{g} (n={results[g]['num_scans']})" for g in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for key, name in table:
        cells = [
            format_figure(results[g]["figures"][key]) if key in results[g]["figures"] else "n/a"
            for g in groups
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"{g}: {results[g]['ci_note']}" for g in groups if results[g].get("ci_note")]
    for key, name in table:
        for g in groups:
            dropped = results[g]["figures"].get(key, {}).get("ci_dropped_resamples", 0)
            if dropped:
                notes.append(f"{g} {name}: {dropped} resamples with no finite value left out of the CI")
    if notes:
        lines += ["", "CI notes: " + "; ".join(notes) + "."]
    return lines


def write_report(out: str, rows: list[dict], *, checkpoint: str = "", num_bootstrap: int = 1000) -> str:
    """Writes ``out/report.md``, ``out/report.json`` and ``out/figures/*.png`` from scored rows; returns
    the report path.

    Two kinds of reference, two sections: voxel and lesion figures over the scans with reference masks
    (``evaluation`` entries; ``report.json["results"]``), and the scan-level figures (Agatston ICC,
    Bland-Altman, risk accuracy, weighted kappa, confusion matrix) over every scan with a reference
    Agatston, from a mask or from a sheet of scores (``report.json["scan_level"]``).
    """
    labelled = [r for r in rows if "evaluation" in r]
    referenced = [r for r in rows if r.get("reference_agatston") is not None]
    sheet_rows = [r for r in referenced if r.get("reference_source") == "sheet"]
    results = metrics.evaluate(summaries_of(labelled), num_bootstrap=num_bootstrap) if labelled else {}
    scan_level = metrics.evaluate_scores(score_summaries_of(referenced), num_bootstrap=num_bootstrap)
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    bland_altman_figure(referenced, os.path.join(fig_dir, "bland_altman.png"))
    confusion_figure(scan_level["all"]["risk_confusion"], os.path.join(fig_dir, "risk_confusion.png"))
    n_overlays = overlay_figure(out, labelled, os.path.join(fig_dir, "overlays.png"))
    lines = [
        "# calcjax scoring report",
        "",
        f"Checkpoint: `{checkpoint}`. Scans scored: {len(rows)}; with reference masks: {len(labelled)}; "
        f"with a scan-level reference score only (sheet): {len(sheet_rows)}.",
        "",
        "Calcium = predicted (or reference) coronary label AND HU >= 130; Agatston as defined in "
        "calcjax.core.agatston (Agatston et al., JACC 1990). "
        f"Figures: value (95% percentile bootstrap CI, {num_bootstrap} resamples of scans).",
        "",
    ]
    if labelled:
        lines += ["## Voxels and lesions (scans with reference masks)", ""]
        lines += [*_table(results, SEGMENTATION_TABLE, list(results)), ""]
    lines += _agreement_lines(scan_level, bool(sheet_rows))
    lines += _figure_lines(n_overlays) + _per_scan_lines(referenced)
    report = {
        "checkpoint": checkpoint,
        "num_bootstrap": num_bootstrap,
        "results": results,
        "scan_level": scan_level,
    }
    write_atomic(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    path = os.path.join(out, "report.md")
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _agreement_lines(scan_level: dict, with_sheet: bool) -> list[str]:
    """The scan-level agreement table and the risk-category confusion matrix (markdown lines)."""
    lines = ["## Agatston and risk category (every scan with a reference: masks or sheet)", ""]
    lines += _table(scan_level, AGREEMENT_TABLE, list(scan_level))
    if with_sheet:
        lines += [
            "",
            "Sheet references: the risk category comes from the sheet's total, which is what the reader "
            "reported; a sheet's per-artery figures need not add up to it (their sum is kept as "
            "`reference_artery_sum` in scores.jsonl).",
        ]
    lines += [
        "",
        "## Risk categories (every scan with a reference; rows reference, columns predicted)",
        "",
        "| ref \\ pred | " + " | ".join(agatston.RISK_CATEGORY_NAMES) + " |",
        "|---|" + "---|" * 5,
    ]
    for i, row in enumerate(scan_level["all"]["risk_confusion"]):
        lines.append(f"| {agatston.RISK_CATEGORY_NAMES[i]} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def _figure_lines(n_overlays: int) -> list[str]:
    lines = ["", "## Figures", "", "![Bland-Altman](figures/bland_altman.png)", ""]
    lines += ["![Risk confusion](figures/risk_confusion.png)", ""]
    if n_overlays:
        lines += ["![Largest disagreements](figures/overlays.png)", ""]
    return lines


def _per_scan_lines(referenced: list[dict]) -> list[str]:
    lines = [
        "## Per scan",
        "",
        "| scan | protocol | reference | slices | Agatston pred | Agatston ref | category pred "
        "| category ref |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in referenced:
        lines.append(
            f"| {r['scan_id']} | {r['protocol']} | {r.get('reference_source', 'mask')} | {r['num_slices']} | "
            f"{r['agatston']:.1f} | {r['reference_agatston']:.1f} | {r['risk_category']} | "
            f"{r['reference_risk_category']} |"
        )
    return lines
