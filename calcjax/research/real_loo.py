r"""Leave one real scan out: each candidate recipe trained without one labelled real scan and scored on it.

  python -m calcjax.research.real_loo --plan PLAN.json --real_shards real_shards --out LOO [--seeds 0,1,2]

``--real_shards`` is ``make real-shards``'s folder: one shard folder per labelled real scan (``gated-1``,
``chest-zero``, ``qrm``, ...) and per variant of one (``gated-1-thick5``: the scan as 5 mm slices,
``data_prep.real_shards --thick_mm``). A fold is a scan: its variants are left out with it, and a
candidate trains on the other scans' variants only where its ``real_variants`` names them
(``["thick5"]``). ``PLAN.json`` is written before the first fold runs and holds the rule
of the choice and the candidates:

  {"rule": "the candidate with the highest mean gated voxel F1 over folds and seeds, ...",
   "candidates": {"NAME": {"config": "configs/smoke.py", "phantom": "PHANTOM_SHARDS:0.5",
                           "real_weight": 0.5, "which": "latest", "overrides": {"train.steps": 300},
                           "score": {"lesion_completion_mm2": 40}}}}

For each candidate, held-out scan (fold) and seed, a run trains (``python -m calcjax.train``) on the
candidate's config with ``data.sources`` = its phantom source (optional) and every other real scan's folder,
sharing ``real_weight`` equally, ``train.seed`` = ``data.seed`` = the seed and the overrides; then the
held-out scan is scored by the scorer (shard route, its defaults: heart region on; a candidate's ``score``
block sets the scorer's rules, ``calcjax.score.options.ScoreOptions`` fields, so that a rule the phantoms
could not choose, lesion completion or the heart region, is chosen on real scans too). One JSON line per run
in ``OUT/results.jsonl`` (a rerun skips the runs already there; candidates whose training is the same,
differing only in their ``score`` block, share one training run per fold and seed), and ``OUT/summary.md`` /
``summary.json``: per candidate and fold the mean and range over seeds, and the gated voxel F1 over all
gated folds with its seed spread (the range, over seeds, of each seed's mean over folds). The plan is copied
to ``OUT/plan.json``; a rerun with another plan is refused, so a choice is never remade after looking. Every
figure here is of a scan the run did not train on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

from calcjax.core import cli, compile_cache
from calcjax.io import outputs
from calcjax.io.atomic import write_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCORER_RULES = {
    "use_heart_region",
    "lesion_completion_mm2",
    "kvp_specific_threshold",
    "batch_size",
    "calcium_probability",
}
VARIANT = re.compile(r"^(?P<scan>.+)-(?P<variant>thick[0-9.]+)$")  # a scan's variant folder
FIGURES = ("voxel_f1", "voxel_precision", "voxel_recall", "lesion_sensitivity", "fp_lesions", "agatston")


class PlanError(ValueError):
    """A plan that cannot be run, or that differs from the one the output folder was started with."""


def load_plan(path: str, out: str) -> dict:
    """The plan (module docstring), checked and kept as ``out/plan.json``; PlanError when it lacks a rule
    or candidates, or differs from the one ``out`` holds."""
    with open(path) as f:
        plan = json.load(f)
    if not str(plan.get("rule", "")).strip() or not plan.get("candidates"):
        raise PlanError(f"{path}: a plan needs its rule and at least one candidate, written before any run")
    for name, c in plan["candidates"].items():
        if "config" not in c or not float(c.get("real_weight", 0)) > 0:
            raise PlanError(f"{path}: candidate {name} needs a config and a real_weight > 0")
        unknown = set(c.get("score", {})) - SCORER_RULES
        if unknown:
            raise PlanError(f"{path}: candidate {name}: {sorted(unknown)} are not scorer rules "
                            f"({', '.join(sorted(SCORER_RULES))})")  # fmt: skip
    try:
        outputs.check_run_record(out, "plan", plan, fix="start another --out for another plan")
    except outputs.RunRecordError as e:
        raise PlanError(str(e)) from None
    return plan


def _shard_folders(real_shards: str) -> list[str]:
    names = sorted(os.listdir(real_shards))
    return [d for d in names if os.path.isfile(os.path.join(real_shards, d, "manifest.json"))]


def folds(real_shards: str) -> list[str]:
    """The real scans under ``real_shards`` (each a shard folder with a manifest), variants not counted."""
    return [d for d in _shard_folders(real_shards) if not VARIANT.match(d)]


def sources_spec(candidate: dict, real_shards: str, held_out: str) -> str:
    """``data.sources`` of one fold: the candidate's phantom source and every other real scan's folder,
    with those scans' variants that the candidate's ``real_variants`` names."""
    wanted = set(candidate.get("real_variants", []))
    others = []
    for f in _shard_folders(real_shards):
        variant = VARIANT.match(f)
        scan = variant["scan"] if variant else f
        if scan != held_out and (not variant or variant["variant"] in wanted):
            others.append(f)
    weight = float(candidate["real_weight"]) / len(others)
    entries = [f"phantom:{candidate['phantom']}"] if candidate.get("phantom") else []
    entries += [
        f"{f.replace('-', '_').replace('.', '_')}:{os.path.join(real_shards, f)}:{weight:g}" for f in others
    ]
    return ",".join(entries)


def train(candidate: dict, spec: str, seed: int, workdir: str) -> None:
    """One training run in a subprocess; RuntimeError with the end of its stderr when it fails."""
    overrides = {"data.sources": spec, "data.shards": "", "train.seed": seed, "data.seed": seed}
    overrides.update(candidate.get("overrides", {}))
    cmd = [sys.executable, "-m", "calcjax.train", f"--config={os.path.join(ROOT, candidate['config'])}",
           f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in overrides.items()]]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training {workdir} failed:\n{done.stderr[-3000:]}")


def score_held_out(
    run: str, which: str, real_shards: str, held_out: str, out: str, rules: dict | None = None
) -> dict:
    """The held-out scan scored by ``run`` (the scorer's defaults, or ``rules``) into ``out`` (a folder a
    killed plan left is gone on with): its figures against its labels."""
    from calcjax.score.cohort import score_cohort
    from calcjax.score.options import ScoreOptions

    shards = os.path.join(real_shards, held_out, "*.array_record")
    score_cohort(ScoreOptions(out=out, shards=shards, checkpoint_path=run, which=which, progress=False,
                              num_bootstrap=0, resume=True, **(rules or {})))  # fmt: skip
    (row,) = outputs.read_jsonl(os.path.join(out, outputs.SCORES))
    e = row["evaluation"]
    tp, fp, fn = e["voxel_tp"], e["voxel_fp"], e["voxel_fn"]
    return {
        "voxel_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "voxel_precision": tp / (tp + fp) if tp + fp else 1.0,
        "voxel_recall": tp / (tp + fn) if tp + fn else 1.0,
        "lesion_sensitivity": e["detected_lesions"] / e["ref_lesions"] if e["ref_lesions"] else None,
        "fp_lesions": e["fp_lesions"],
        "agatston": row["agatston"],
        "reference_agatston": row["reference_agatston"],
        "risk_category": row["risk_category"],
        "reference_risk_category": row["reference_risk_category"],
    }


def training_of(plan: dict, name: str) -> str:
    """The first candidate, in the plan's order, whose training is the same as ``name``'s (config, phantom
    source, real weight and overrides): its runs serve every candidate that differs only in how it scores."""
    keys = ("config", "phantom", "real_weight", "real_variants", "overrides")
    mine = [plan["candidates"][name].get(k) for k in keys]
    return next(n for n, c in plan["candidates"].items() if [c.get(k) for k in keys] == mine)


def trained_run(plan: dict, name: str, real_shards: str, held_out: str, seed: int, out: str) -> str:
    """The run folder of ``name``'s training without ``held_out`` at ``seed``, trained now unless a finished
    one is there (``trained.json`` is written when its training ends)."""
    trainer = training_of(plan, name)
    workdir = os.path.join(out, "runs", trainer, held_out, f"seed-{seed}")
    marker = os.path.join(workdir, "trained.json")
    if not os.path.isfile(marker):
        spec = sources_spec(plan["candidates"][trainer], real_shards, held_out)
        train(plan["candidates"][trainer], spec, seed, workdir)
        write_atomic(marker, json.dumps({"candidate": trainer, "sources": spec, "seed": seed}) + "\n")
    return workdir


def run_plan(plan: dict, real_shards: str, out: str, seeds: list[int], only: dict | None = None) -> list:
    """Every (candidate, fold, seed) run not yet in ``out/results.jsonl`` (``only``: ``{"candidates": [...],
    "folds": [...]}`` to run a part now, the rest later); returns all result lines."""
    only = only or {}
    path = os.path.join(out, "results.jsonl")
    done = {(r["candidate"], r["held_out"], r["seed"]) for r in outputs.read_jsonl(path, repair=True)}
    for name, candidate in plan["candidates"].items():
        if only.get("candidates") and name not in only["candidates"]:
            continue
        for held_out in [f for f in folds(real_shards) if not only.get("folds") or f in only["folds"]]:
            for seed in seeds:
                if (name, held_out, seed) in done:
                    continue
                run = trained_run(plan, name, real_shards, held_out, seed, out)
                scored = os.path.join(out, "runs", name, held_out, f"seed-{seed}", "score")
                figures = score_held_out(run, candidate.get("which", "latest"), real_shards, held_out, scored,
                                         candidate.get("score"))  # fmt: skip
                outputs.append_jsonl(path, {"candidate": name, "held_out": held_out, "seed": seed, **figures})
    return outputs.read_jsonl(path)


def summarize(results: list[dict]) -> dict:
    """Per candidate: per fold the mean and [min, max] over seeds of each figure, and the gated voxel F1
    (the mean over gated folds) with its seed spread."""
    summary = {}
    for name in sorted({r["candidate"] for r in results}):
        mine = [r for r in results if r["candidate"] == name]
        per_fold = {}
        for fold in sorted({r["held_out"] for r in mine}):
            rows = [r for r in mine if r["held_out"] == fold]
            per_fold[fold] = {
                k: [round(float(np.mean(v)), 4), round(min(v), 4), round(max(v), 4)]
                for k in FIGURES if (v := [r[k] for r in rows if r[k] is not None])
            }  # fmt: skip
        gated = [r for r in mine if r["held_out"].startswith("gated")]
        seeds = sorted({r["seed"] for r in gated})
        by_seed = [float(np.mean([r["voxel_f1"] for r in gated if r["seed"] == s])) for s in seeds]
        summary[name] = {"per_fold": per_fold}
        if by_seed:
            summary[name]["gated_voxel_f1"] = round(float(np.mean(by_seed)), 4)
            summary[name]["gated_voxel_f1_seed_range"] = [round(min(by_seed), 4), round(max(by_seed), 4)]
    return summary


def _cell(v) -> str:
    """``mean (min-max)`` over seeds, or empty."""
    return "" if v is None else f"{v[0]:g} ({v[1]:g}-{v[2]:g})"


def write_summary(out: str, plan: dict, summary: dict) -> None:
    """``out/summary.md`` (the rule, the candidates' gated voxel F1, every fold's figures) and
    ``out/summary.json``."""
    lines = ["# Leave one real scan out", "", f"Rule (written before the first run): {plan['rule']}", ""]
    lines += ["| candidate | gated voxel F1 (mean over folds and seeds) | seed range |", "|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s.get('gated_voxel_f1', '')} | {s.get('gated_voxel_f1_seed_range', '')} |")
    lines += ["", "| candidate | held-out scan | " + " | ".join(FIGURES) + " |"]
    lines.append("|---|---|" + "---|" * len(FIGURES))
    for name, s in summary.items():
        for fold, figs in s["per_fold"].items():
            cells = [_cell(figs.get(k)) for k in FIGURES]
            lines.append(f"| {name} | {fold} | " + " | ".join(cells) + " |")
    write_atomic(os.path.join(out, "summary.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m calcjax.research.real_loo", description=__doc__.splitlines()[0]
    )
    p.add_argument("--plan", required=True, help="the plan: rule and candidates (JSON), written beforehand")
    p.add_argument("--real_shards", required=True, help="make real-shards's folder (one folder per scan)")
    p.add_argument("--out", required=True, help="output folder (results.jsonl, summary.md, runs/)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--folds", default="", help="only these held-out scans now (default: every one)")
    p.add_argument("--candidates", default="", help="only these candidates now (default: every one)")
    args = p.parse_args(argv)

    def job() -> dict:
        compile_cache.enable()  # the runs share their compiled train step and the scorer's forward
        os.makedirs(args.out, exist_ok=True)
        plan = load_plan(args.plan, args.out)
        seeds = [int(s) for s in args.seeds.split(",")]
        only = {k: [x for x in getattr(args, k).split(",") if x] for k in ("folds", "candidates")}
        results = run_plan(plan, args.real_shards, args.out, seeds, only)
        summary = summarize(results)
        write_summary(args.out, plan, summary)
        return summary

    summary = cli.run_or_exit("calcjax.research.real_loo", job, (PlanError, FileNotFoundError, RuntimeError))
    print(json.dumps({n: s.get("gated_voxel_f1") for n, s in summary.items()}))


if __name__ == "__main__":
    main()
