r"""Reproducibility study: a JAX run against its PyTorch-baseline twin.

  python -m calcjax.research.compare RUN_JAX RUN_TORCH --out DIR [--shards 'SHARDS/test-*.array_record']

Reads both workdirs' ``metrics.jsonl`` (``calcjax.train`` and ``calcjax.research.torch_baseline.train`` write
the same keys) and writes to DIR:

- ``curves.png``: training loss and validation voxel F1 of both runs against the step, on one figure;
- with ``--shards``: each run's best checkpoint scored on those shards (``calcjax.score``, into
  ``DIR/jax`` and ``DIR/torch``), and ``comparison.md`` / ``comparison.json`` with the final metrics of
  each run with bootstrap CIs (``calcjax.core.metrics``), and their agreement scan by scan: ICC(2,1) and
  Bland-Altman of the two frameworks' Agatston scores, and the linear weighted kappa and confusion matrix
  between their risk categories (the PyTorch run's categories as "reference").
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from calcjax.core import cli, metrics  # noqa: E402
from calcjax.io import outputs  # noqa: E402
from calcjax.report import markdown as report  # noqa: E402
from calcjax.score import cohort as score  # noqa: E402
from calcjax.score.options import ScoreOptions  # noqa: E402


def read_metrics(workdir: str) -> list[dict]:
    return outputs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts, strict=True)
    return np.asarray(steps), np.asarray(values, float)


def curves_figure(runs: dict[str, list[dict]], path: str) -> None:
    """Training loss and validation voxel F1 of each run against the step (one PNG)."""
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in runs.items():
        ax_loss.plot(*_series(rows, "train_loss"), label=name)
        ax_f1.plot(*_series(rows, "val_voxel_f1"), marker="o", label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (bootstrap-IoU)")
    ax_loss.set_yscale("log")
    ax_f1.set_xlabel("step")
    ax_f1.set_ylabel("validation voxel F1")
    ax_f1.set_ylim(0, 1)
    for ax in (ax_loss, ax_f1):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def agreement(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Scan-by-scan agreement of two scorings of the same scans (matched by scan id)."""
    b = {r["scan_id"]: r for r in rows_b}
    pairs = [(r, b[r["scan_id"]]) for r in rows_a if r["scan_id"] in b]
    if not pairs:
        return {"num_scans": 0}
    aga = np.array([[ra["agatston"], rb["agatston"]] for ra, rb in pairs], float)
    cat_a = np.array([ra["risk_category"] for ra, _ in pairs])
    cat_b = np.array([rb["risk_category"] for _, rb in pairs])
    conf = metrics.confusion_matrix(cat_b, cat_a)
    return {
        "num_scans": len(pairs),
        "agatston_icc": float(metrics.icc_2_1(aga[None])[0]) if len(pairs) >= 2 else float("nan"),
        "bland_altman": metrics.bland_altman(aga[:, 0], aga[:, 1]),
        "risk_kappa": float(metrics.weighted_kappa(conf[None])[0]),
        "risk_agreement": float((cat_a == cat_b).mean()),
        "risk_confusion": conf.tolist(),
    }


def compare(
    run_jax: str,
    run_torch: str,
    out: str,
    *,
    shards: str | None = None,
    which: str = "best",
    num_bootstrap: int = 1000,
) -> dict:
    """Writes the comparison of two runs into ``out`` (module docstring); returns ``comparison.json``."""
    os.makedirs(out, exist_ok=True)
    runs = {"JAX": read_metrics(run_jax), "PyTorch": read_metrics(run_torch)}
    for name, rows in runs.items():
        if not rows:
            raise FileNotFoundError(f"{name} run has no metrics.jsonl rows")
    curves_figure(runs, os.path.join(out, "curves.png"))
    result: dict = {"curves": "curves.png", "final_training": {}}
    for name, rows in runs.items():
        last = {}
        for r in rows:
            last.update({k: v for k, v in r.items() if k.startswith(("train_", "val_")) or k == "step"})
        result["final_training"][name] = last
    if shards:
        scored = {}
        for name, run, sub in (("JAX", run_jax, "jax"), ("PyTorch", run_torch, "torch")):
            folder = os.path.join(out, sub)
            score.score_cohort(
                ScoreOptions(
                    checkpoint_path=run,
                    out=folder,
                    shards=shards,
                    which=which,
                    resume=True,
                    num_bootstrap=num_bootstrap,
                    progress=False,
                )
            )
            scored[name] = outputs.read_jsonl(os.path.join(folder, outputs.SCORES))
        result["test"] = {}
        for name, rows in scored.items():
            summaries = report.summaries_of(rows)
            result["test"][name] = (
                metrics.evaluate(summaries, num_bootstrap=num_bootstrap)["all"] if summaries else None
            )
        result["agreement"] = agreement(scored["JAX"], scored["PyTorch"])
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump(result, f, indent=1)
    _markdown(result, os.path.join(out, "comparison.md"))
    return result


def _markdown(result: dict, path: str) -> None:
    lines = [
        "# JAX vs PyTorch",
        "",
        "![curves](curves.png)",
        "",
        "## End of training",
        "",
        "| run | step | train loss | val voxel F1 |",
        "|---|---|---|---|",
    ]
    for name, last in result["final_training"].items():
        f1 = last.get("val_voxel_f1")
        lines.append(
            f"| {name} | {last.get('step')} | {last.get('train_loss', float('nan')):.4f} | "
            f"{'n/a' if f1 is None else f'{f1:.3f}'} |"
        )
    if result.get("test"):
        groups = [g for g in result["test"] if result["test"][g]]
        lines += [
            "",
            "## Test shards (value, 95% bootstrap CI)",
            "",
            "| figure | " + " | ".join(groups) + " |",
            "|---|" + "---|" * len(groups),
        ]
        for key, label in report.TABLE:
            cells = [report.format_figure(result["test"][g]["figures"][key]) for g in groups]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    a = result.get("agreement")
    if a and a.get("num_scans"):
        ba = a["bland_altman"]
        lines += [
            "",
            f"## Agreement between the frameworks ({a['num_scans']} scans)",
            "",
            f"- Agatston ICC(2,1): {a['agatston_icc']:.4f}",
            f"- Agatston Bland-Altman (JAX - PyTorch): mean {ba['mean_difference']:.3f}, "
            f"limits {ba['lower_limit']:.3f} to {ba['upper_limit']:.3f}",
            f"- risk categories: agreement {a['risk_agreement']:.3f}, linear weighted kappa "
            f"{a['risk_kappa']:.4f}",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so modules import side by side)."""
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_string("shards", None, "Glob of test shard files to score both checkpoints on.")
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of each run to score.")
    flags.DEFINE_integer("num_bootstrap", 1000, "Bootstrap resamples for the CIs.")


def main(argv):
    if len(argv) != 3 or flags.FLAGS.out is None:
        raise app.UsageError(
            "usage: python -m calcjax.research.compare RUN_JAX RUN_TORCH --out DIR [--shards GLOB]"
        )
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    result = compare(
        argv[1],
        argv[2],
        flags.FLAGS.out,
        shards=flags.FLAGS.shards,
        which=flags.FLAGS.which,
        num_bootstrap=flags.FLAGS.num_bootstrap,
    )
    print(f"comparison: {os.path.join(flags.FLAGS.out, 'comparison.md')}")
    if "agreement" in result:
        print(json.dumps({k: v for k, v in result["agreement"].items() if k != "risk_confusion"}))


def run() -> None:
    """The console command ``calcjax-compare``."""
    cli.run_command("calcjax-compare", "calcjax.research.compare", __doc__, main, define_flags)


if __name__ == "__main__":
    run()
