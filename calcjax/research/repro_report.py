"""The reproducibility study's report (Markdown, ``docs/reproducibility.md``) from its figures
(``calcjax.research.repro``'s ``study.json``): the verdict, each figure beside the seed spread, the
agreement, the determinism tables with where 1 and 2 devices part, throughput and the GPU estimate."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from calcjax.io.atomic import write_atomic


def spread(values: list[float]) -> dict:
    """Mean, smallest and largest of ``values``."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


H200_TORCH_STEP_S = 0.161  # the PyTorch twin, default network, batch 16 at 512x512, bf16 (docs/benchmarks.md)


def _cell(s: dict, digits: int = 3) -> str:
    """A :func:`spread` as "mean [min, max]"."""
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _figure_rows(r: dict) -> list[str]:
    """Each figure: both frameworks, the gap between their means and the larger seed range beside it."""
    rows = ["| figure (test split) | JAX: mean [range over seeds] | PyTorch | framework gap | seed spread | "
            "gap within the spread |", "|---|---|---|---|---|---|"]  # fmt: skip
    for k in r["per_framework"]["jax"]:
        j, t = r["per_framework"]["jax"][k], r["per_framework"]["torch"][k]
        gap, seed_spread = abs(j["mean"] - t["mean"]), max(j["max"] - j["min"], t["max"] - t["min"])
        rows.append(f"| {k} | {_cell(j)} | {_cell(t)} | {gap:.3f} | {seed_spread:.3f} | "
                    f"{'yes' if gap <= seed_spread else 'no'} |")  # fmt: skip
    return rows


def _kappa_cell(pairs: list[dict]) -> str:
    """The weighted kappa's spread over the pairs where it is defined, and how many pairs it is not."""
    defined = [p["kappa"] for p in pairs if p["kappa"] is not None]
    cell = _cell(spread(defined)) if defined else "undefined"
    undefined = len(pairs) - len(defined)
    return cell + (f" ({undefined} of {len(pairs)} pairs undefined)" if defined and undefined else "")


def _agreement_rows(r: dict) -> list[str]:
    """The agreement table: between frameworks at each seed, and between the seeds of each framework."""
    rows = ["| Agatston agreement, scan by scan | ICC(2,1) | Bland-Altman mean difference | "
            "same risk category | weighted kappa |", "|---|---|---|---|---|"]  # fmt: skip
    names = {"between_frameworks": "JAX against PyTorch, same seed",
             "between_seeds_jax": "JAX seed against JAX seed",
             "between_seeds_torch": "PyTorch seed against PyTorch seed"}  # fmt: skip
    for key, label in names.items():
        pairs = r["agreement"][key]
        if not pairs:
            rows.append(f"| {label} | | | | |")
            continue
        measures = ("icc", "bland_altman_mean", "category_agreement")
        cells = [_cell(spread([p[m] for p in pairs])) for m in measures]
        rows.append(f"| {label} | " + " | ".join([*cells, _kappa_cell(pairs)]) + " |")
    rows += ["", "The weighted kappa is undefined where a scoring puts every scan in one risk category (it "
             "is then 0, or 1 when both agree, whatever the scans); the share of scans in the same category "
             "is given beside it."]  # fmt: skip
    return rows


def _determinism_rows(d: dict | None) -> list[str]:
    """The determinism table (runs repeated; 1 against 2 devices) and where 1 and 2 devices part."""
    if not d:
        return ["Determinism was not measured (`--determinism_steps 0`)."]
    rows = [f"Determinism, {d['steps']} steps of the first seed, loss logged at every step:", "",
            "| runs compared | weights bitwise equal | largest weight difference (array) | largest relative "
            "weight difference (array) | largest loss difference | first step that differs |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for key, label in (("jax_repeat", "JAX, run twice"), ("torch_repeat", "PyTorch, run twice"),
                       ("jax_1_vs_2_devices", "JAX, 1 against 2 CPU devices")):  # fmt: skip
        c = d[key]
        equal = "yes" if c["bitwise_equal"] else "no"
        where = f" (`{c['largest_relative_in']}`)" if c["max_relative_weight_difference"] else ""
        at = f" (`{c['largest_in']}`)" if c["max_weight_difference"] else ""
        rows.append(f"| {label} | {equal} | {c['max_weight_difference']:.3g}{at} | "
                    f"{c['max_relative_weight_difference']:.3g}{where} | "
                    f"{c['max_loss_difference']:.3g} | {c['first_differing_step'] or '-'} |")  # fmt: skip
    return rows + ["", *_divergence_rows(d.get("first_step_1_vs_2_devices"))]


DIVERGENCE_LABELS = {
    "eval_logits": "eval-mode logits (running BatchNorm statistics: per-sample operations only)",
    "batch_stats": "BatchNorm batch statistics of the train-mode forward pass",
    "logits": "train-mode logits", "loss": "loss", "gradients": "gradients",
}  # fmt: skip


def _divergence_rows(f: dict | None) -> list[str]:
    """Where 1 and 2 devices part: the first step's quantities, and the operation their figures name."""
    if not f:
        return []
    rows = [f"Where 1 and 2 devices part: the first train step from the same weights on the same batch of "
            f"{f['batch_size']} (`python -m calcjax.research.device_divergence`), quantity by quantity:", "",
            "| quantity | bitwise equal | arrays differing | largest difference | "
            "largest relative difference |", "|---|---|---|---|---|"]  # fmt: skip
    for key, label in DIVERGENCE_LABELS.items():
        q = f[key]
        rows.append(
            f"| {label} | {'yes' if q['bitwise_equal'] else 'no'} | {q['arrays_differing']} of "
            f"{q['arrays']} | {q['max_abs_difference']:.3g} | {q['max_relative_difference']:.3g} |"
        )
    m = f["mean_of_a_tensor"]
    mechanism = m["two_devices_equal_half_sums"] and not m["two_devices_equal_one"]
    if f["eval_logits"]["bitwise_equal"] and not f["batch_stats"]["bitwise_equal"] and mechanism:
        rows += ["", "Every per-sample operation (convolutions, activations, BatchNorm with its running "
                 "statistics) gives the same bits on 1 and 2 devices; the first quantities that differ are "
                 "the BatchNorm batch statistics, reductions over the batch axis. On 2 devices XLA computes "
                 "each reduction over the batch as per-device partial sums joined by an all-reduce "
                 f"({f['all_reduces_in_2_device_step']} in the compiled step: the BatchNorm statistics, the "
                 "loss's sums, every parameter's gradient), which adds the float32 terms in another order: "
                 "a float32 tensor shaped like the first layer's activations has a 2-device mean bitwise "
                 "equal to its two half-batch sums added afterwards and different from its 1-device mean "
                 f"(by {m['max_abs_difference_one_vs_two']:.2g}). These last-bit differences grow through "
                 "training to the drift in the table above; they are float32 rounding, not a fault. (The "
                 "loss a step logs is computed before its update, and the warm-up's first update has "
                 "learning rate 0, so the first two logged losses can agree although the gradients "
                 "differ.)"]  # fmt: skip
    else:
        rows += ["", "The figures do not match reassociated batch reductions alone (a per-sample "
                 "operation differs, or the 2-device mean is not the sum of its halves): to be "
                 "investigated."]  # fmt: skip
    return rows


def write_doc(r: dict, path: str, plot: str) -> None:
    """The report (Markdown) with its plot beside it."""
    e = r["equivalence"]
    steps = r["recipe_steps"]
    total = f"{steps} steps x {len(r['seeds'])} seeds x 2 frameworks"
    image = os.path.splitext(path)[0] + "_loss_curves.png"
    gpu_min = steps * len(r["seeds"]) * 2 * H200_TORCH_STEP_S / 60
    shutil.copy(plot, image)
    date = r.get("date") or time.strftime("%Y-%m-%d")
    lines = [
        "# Reproducibility: JAX against the PyTorch baseline", "",
        f"Generated by `{r['command']}` at commit {r['commit']} on {date}: the recipe "
        f"`{r['config']}` (overrides {r['overrides'] or 'none'}) trained in both frameworks from the same "
        f"initial weights and grain stream, seeds {', '.join(map(str, r['seeds']))}, each scored by the same "
        "scorer on the phantom test split."
        + (f" This report was written again with `--doc_only` at commit {r['reported_at']}."
           if r.get("reported_at") else ""), "",
        f"**Verdict: {e['verdict']}** (mean voxel F1 JAX - PyTorch = {e['difference']:+.4f}; two one-sided "
        f"Welch tests, p = {e['p']:.3g}; margin +-{e['margin']:g} stated before the runs).", "",
        *_figure_rows(r), "", *_agreement_rows(r), "",
        f"![training loss, mean and range over seeds]({os.path.basename(image)})", "",
        *_determinism_rows(r["determinism"]), "",
        "| trainer | steps/s [range over seeds] | seconds per run |", "|---|---|---|",
        *[f"| {fw} | {_cell(r['steps_per_s'][fw], 2)} | {_cell(r['seconds_per_run'][fw], 0)} |"
          for fw in r["steps_per_s"]],
        "", "Steps/s is the median of each run's log lines (one per logging interval), robust to an interval "
        "slowed by other work on the machine; seconds per run count everything (start, compilation, "
        "validation, checkpoints) and any such sharing.",
        "", f"On one H200 the {total} would take at most about {gpu_min:.1f} min of training (an estimate: "
        "the PyTorch twin's default-network step there, 0.16 s at batch 16, 512x512, bf16; this recipe's "
        "network is smaller).",
    ]  # fmt: skip
    write_atomic(path, "\n".join(lines) + "\n")
