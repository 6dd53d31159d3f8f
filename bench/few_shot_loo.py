"""Few-shot fine-tuning on real gated scans, leave one out: what a little real data buys.

  python bench/few_shot_loo.py [--real $CALCJAX_REAL_DATA] [--steps 300] [--work /tmp/calcjax-loo]

For each of the real sample's three gated COCA scans with calcium masks: the shipped phantom-trained model
(``train.init_from``) fine-tuned with ``configs/smoke.py`` on the other two (their shards built by
``data_prep.builder`` in ``--work``, outside the repository), then the held-out scan scored through the
DICOM route with the heart region, as ``make real-eval`` scores it; and the shipped model itself on the
same scan. One JSON line per (fold, model) with the scan's voxel precision / recall / F1, lesion
sensitivity, false-positive lesions and risk categories, then one line per model over the three held-out
scans (``calcjax.core.metrics.evaluate``, no CIs: three scans).

The fine-tuning settings below were fixed before any fold ran and were not changed after looking at
results (the held-out scans are the test set; no validation scan is left to tune on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Fixed in advance (module docstring): a short, gentle fine-tune of the shipped model.
FINE_TUNE = {
    "train.steps": 300,
    "train.learning_rate": 3e-4,
    "train.warmup_steps": 20,
    "train.batch_size": 8,
    "train.eval_every": 100_000,  # no validation scan: the held-out scan is the test
    "train.checkpoint_every": 300,
    "data.crop": 96,
}


def _link_release(real_gated: str, ids: list[str], dest: str) -> str:
    """A COCA-layout tree (``patient/<id>/<series>/`` + ``calcium_xml/<id>.xml``) of file links to the
    given patients under ``dest``; returns its root."""
    root = os.path.join(dest, "Gated_release_final")
    for pid in ids:
        for series in sorted(os.listdir(os.path.join(real_gated, "patient", pid))):
            src = os.path.join(real_gated, "patient", pid, series)
            dst = os.path.join(root, "patient", pid, series)
            os.makedirs(dst, exist_ok=True)
            for f in sorted(os.listdir(src)):
                os.symlink(os.path.join(src, f), os.path.join(dst, f))
        os.makedirs(os.path.join(root, "calcium_xml"), exist_ok=True)
        os.symlink(
            os.path.join(real_gated, "calcium_xml", f"{pid}.xml"),
            os.path.join(root, "calcium_xml", f"{pid}.xml"),
        )
    return root


def _score(test_root: str, checkpoint: str | None, out: str):
    from calcjax.core import metrics
    from calcjax.score import cohort as score
    from calcjax.score.options import ScoreOptions

    score.score_cohort(
        ScoreOptions(
            checkpoint_path=checkpoint,
            which="latest",
            out=out,
            dicom_dir=test_root,
            progress=False,
            num_bootstrap=0,
        )
    )
    with open(os.path.join(out, "scores.jsonl")) as f:
        (row,) = [json.loads(line) for line in f]
    return row, metrics.ScanSummary.from_counts(row["evaluation"], row["scan_id"], row["protocol"])


def _figures(s) -> dict:
    tp, fp, fn = s.voxel_tp, s.voxel_fp, s.voxel_fn
    return {
        "voxel_precision": round(tp / max(tp + fp, 1), 3),
        "voxel_recall": round(tp / max(tp + fn, 1), 3),
        "voxel_f1": round(2 * tp / max(2 * tp + fp + fn, 1), 3),
        "lesions_found": int(s.detected_lesions),
        "lesions": int(s.ref_lesions),
        "fp_lesions": int(s.fp_lesions),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--real", default=os.environ.get("CALCJAX_REAL_DATA", os.path.join(ROOT, "..", "shared", "data"))
    )
    p.add_argument("--work", default="/tmp/calcjax-loo")
    p.add_argument("--steps", type=int, default=FINE_TUNE["train.steps"])
    args = p.parse_args()
    from calcjax.core import metrics
    from calcjax.model import files as model_file
    from data_prep import builder

    gated = os.path.join(args.real, "coca-sample", "Gated_release_final")
    ids = sorted(os.listdir(os.path.join(gated, "patient")))
    shutil.rmtree(args.work, ignore_errors=True)
    summaries = {"shipped": [], "fine_tuned": []}
    for held in ids:
        fold = os.path.join(args.work, f"fold-{held}")
        train_root = _link_release(gated, [i for i in ids if i != held], os.path.join(fold, "train"))
        test_root = _link_release(gated, [held], os.path.join(fold, "test"))
        shards = os.path.join(fold, "shards")
        builder.build(
            builder.BuildOptions(
                train_root, shards, split="train=1", salt="calcjax-few-shot-loo", progress=False
            )
        )
        run = os.path.join(fold, "run")
        overrides = {**FINE_TUNE, "train.steps": args.steps, "train.checkpoint_every": args.steps}
        cmd = [sys.executable, "-m", "calcjax.train", f"--config={os.path.join(ROOT, 'configs', 'smoke.py')}",
               f"--workdir={run}", f"--config.data.shards={shards}",
               f"--config.train.init_from={model_file.DEFAULT_MODEL}",
               *[f"--config.{k}={v}" for k, v in overrides.items()]]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fine-tuning fold {held} failed:\n{done.stderr[-3000:]}")
        for name, ckpt in (("shipped", None), ("fine_tuned", run)):
            row, s = _score(test_root, ckpt, os.path.join(fold, f"score-{name}"))
            summaries[name].append(s)
            row_out = {
                "bench": "few_shot_loo",
                "held_out": f"gated scan {held}",
                "model": name,
                **_figures(s),
            }
            row_out.update(
                agatston=round(row["agatston"], 1), reference_agatston=round(row["reference_agatston"], 1)
            )
            row_out.update(risk=row["risk_category"], reference_risk=row["reference_risk_category"])
            print(json.dumps(row_out), flush=True)
    for name, group in summaries.items():
        fig = metrics.evaluate(group, num_bootstrap=0)["all"]["figures"]
        keys = ("voxel_precision", "voxel_recall", "voxel_f1", "voxel_f1_LM", "voxel_f1_LAD", "voxel_f1_LCX",
                "voxel_f1_RCA", "lesion_sensitivity", "fp_lesions_per_scan", "risk_accuracy")  # fmt: skip
        total = {"bench": "few_shot_loo", "model": name, "scans": len(group), "steps": args.steps}
        total.update({k: round(float(fig[k]["value"]), 3) for k in keys if k in fig})
        print(json.dumps(total), flush=True)


if __name__ == "__main__":
    main()
