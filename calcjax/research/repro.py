r"""The reproducibility study: JAX against the PyTorch baseline, the framework gap set beside the seed spread.

  python -m calcjax.research.repro --config configs/shipped.py --shards SHARDS --out OUT \
      [--seeds 0,1,2] [--margin 0.05] [--determinism_steps 20] [--doc docs/reproducibility.md] \
      [--override train.steps=1600 ...]

For each seed and framework, one training run of the recipe from the same initial weights and the same
grain stream (``calcjax.train`` and ``calcjax.research.torch_baseline.train``, ``train.seed`` =
``data.seed`` = the seed), each scored by the same scorer (its defaults) on ``SHARDS``' test split. Then:

- training-loss curves, mean and range over seeds per framework, on one plot (``OUT/loss_curves.png``);
- per run the test split's voxel F1, lesion sensitivity and false-positive lesions per scan, and per
  framework their mean and range over seeds;
- scan-by-scan agreement of Agatston and risk categories (ICC(2,1), Bland-Altman, linear weighted kappa)
  between the frameworks at each seed, beside the same agreement between the seeds of one framework;
- an equivalence test: two one-sided Welch t-tests on the difference in mean voxel F1 (JAX - PyTorch)
  against ``--margin``, stated before the runs; the verdict is "equivalent within +-margin" when both
  p-values are below 0.05, else "not shown equivalent";
- determinism: the first seed trained again for ``--determinism_steps`` steps (JAX twice, PyTorch twice,
  JAX on 2 CPU devices): whether the exported weights are bitwise equal, the largest weight and loss
  differences; and the first train step on 1 and on 2 devices compared quantity by quantity
  (``calcjax.research.device_divergence``), which names the operation where they part;
- throughput: each trainer's steps/s in these runs.

``OUT/study.json`` holds every figure; ``--doc`` writes the report (tables, plot, verdict, the command and
the commit). Runs already finished in OUT are not trained again; ``--doc_only`` writes the report again
from ``OUT/study.json``, the runs' logs, weights and scores, training and scoring nothing (it computes the
first-step comparison if the study predates it).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from calcjax.core import cli, compile_cache, metrics
from calcjax.io import outputs
from calcjax.io.atomic import write_atomic
from calcjax.native.library import CPU_KERNELS_ENV
from calcjax.research.repro_report import spread, write_doc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMEWORKS = {"jax": "calcjax.train", "torch": "calcjax.research.torch_baseline.train"}
FIGURES = ("voxel_f1", "lesion_sensitivity", "fp_lesions_per_scan")


def train(framework: str, config: str, shards: str, seed: int, workdir: str, overrides: dict,
          env: dict | None = None) -> float:  # fmt: skip
    """One training run in a subprocess (skipped when ``workdir/done.json`` exists); its wall seconds."""
    done = os.path.join(workdir, "done.json")
    if os.path.exists(done):
        return json.load(open(done))["seconds"]
    shutil.rmtree(workdir, ignore_errors=True)  # a run cut short starts again (the twin does not resume)
    flags = {"data.shards": shards, "train.seed": seed, "data.seed": seed, **overrides}
    cmd = [sys.executable, "-m", FRAMEWORKS[framework], f"--config={os.path.join(ROOT, config)}",
           f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()]]  # fmt: skip
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if run.returncode != 0:
        raise RuntimeError(f"{framework} training {workdir} failed:\n{run.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    write_atomic(done, json.dumps({"seconds": seconds}))
    return seconds


def score(workdir: str, shards: str, out: str) -> list[dict]:
    """The run's best checkpoint scored on the test split (the scorer's defaults); its rows."""
    from calcjax.score.cohort import score_cohort
    from calcjax.score.options import ScoreOptions

    if not os.path.exists(os.path.join(out, outputs.SCORES_CSV)):
        score_cohort(ScoreOptions(out=out, shards=os.path.join(shards, "test-*.array_record"),
                                  checkpoint_path=workdir, which="best", resume=True, progress=False,
                                  num_bootstrap=0))  # fmt: skip
    return outputs.read_jsonl(os.path.join(out, outputs.SCORES))


def run_figures(rows: list[dict]) -> dict:
    """Voxel F1, lesion sensitivity and false-positive lesions per scan over the scored rows."""
    from calcjax.report.markdown import summaries_of

    figures = metrics.evaluate(summaries_of(rows), num_bootstrap=0)["all"]["figures"]
    return {k: float(figures[k]["value"]) for k in FIGURES}


def agreement(a: list[dict], b: list[dict]) -> dict:
    """Scan-by-scan agreement of two scorings of the same scans (matched by scan id). The weighted kappa is
    None (undefined) where either scoring puts every scan in one risk category: Cohen's kappa is then 0
    (or 1, by convention, when both agree) whatever the scans, so it says nothing."""
    from calcjax.research.compare import agreement as pair_agreement

    g = pair_agreement(a, b)
    conf = np.asarray(g["risk_confusion"])
    one_category = min(np.count_nonzero(conf.sum(axis=0)), np.count_nonzero(conf.sum(axis=1))) <= 1
    return {"icc": g["agatston_icc"], "bland_altman_mean": g["bland_altman"]["mean_difference"],
            "bland_altman_limits": [g["bland_altman"]["lower_limit"], g["bland_altman"]["upper_limit"]],
            "kappa": None if one_category else g["risk_kappa"], "category_agreement": g["risk_agreement"],
            "scans": g["num_scans"]}  # fmt: skip


def agreements(scored: dict[str, dict[int, list[dict]]]) -> dict:
    """Between frameworks at each seed, and between the seeds of each framework (every pair)."""
    seeds = sorted(scored["jax"])
    out = {"between_frameworks": [agreement(scored["jax"][s], scored["torch"][s]) for s in seeds]}
    for fw in FRAMEWORKS:
        out[f"between_seeds_{fw}"] = [agreement(scored[fw][a], scored[fw][b]) for a, b in
                                      itertools.combinations(seeds, 2)]  # fmt: skip
    return out


def tost(a: list[float], b: list[float], margin: float) -> dict:
    """Two one-sided Welch t-tests of mean(a) - mean(b) within (-margin, margin)."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        p = 0.0 if abs(a.mean() - b.mean()) < margin and len(a) >= 2 and len(b) >= 2 else 1.0
        p_low = p_high = p
    else:
        p_low = float(stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue)
        p_high = float(stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue)
    p = max(p_low, p_high)
    verdict = f"equivalent within +-{margin:g}" if p < 0.05 else f"not shown equivalent within +-{margin:g}"
    return {"difference": float(a.mean() - b.mean()), "margin": margin, "p_lower": p_low, "p_upper": p_high,
            "p": p, "verdict": verdict}  # fmt: skip


def loss_curves(workdirs: dict[str, list[str]], path: str) -> dict:
    """Training loss against the step, mean and range over seeds per framework (one PNG); the series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series = {}
    for fw, dirs in workdirs.items():
        runs = [{r["step"]: r["train_loss"] for r in outputs.read_jsonl(os.path.join(d, "metrics.jsonl"))
                 if "train_loss" in r} for d in dirs]  # fmt: skip
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        values = np.array([[r[s] for s in steps] for r in runs])
        ax.plot(steps, values.mean(axis=0), label=f"{fw} (mean of {len(runs)} seeds)")
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.25)
        lo, hi = values.min(axis=0).tolist(), values.max(axis=0).tolist()
        series[fw] = {"steps": steps, "mean": values.mean(axis=0).tolist(), "min": lo, "max": hi}
    ax.set(xlabel="step", ylabel="training loss", title="JAX and PyTorch: training loss over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return series


def steps_per_s(workdir: str) -> float | None:
    """The trainer's median steps/s over its log lines (robust to an interval slowed by other work)."""
    rates = [r["steps_per_s"] for r in outputs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if r.get("steps_per_s")]  # fmt: skip
    return float(np.median(rates)) if rates else None


def weights_of(workdir: str) -> dict[str, np.ndarray]:
    """The run's last weights (parameters and batch statistics), by path."""
    import jax
    from flax import nnx

    from calcjax.model import checkpoint

    _, model = checkpoint.load_for_inference(workdir, "latest")
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tree = {"params": params.to_pure_dict(), "batch_stats": stats.to_pure_dict()}
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def compare_runs(a: str, b: str) -> dict:
    """Bitwise equality of two runs' last weights, their largest weight difference (absolute, and relative
    to the array's largest magnitude, with that array), and the largest difference of their training losses
    (logged every step) with the first step where they differ."""
    wa, wb = weights_of(a), weights_of(b)
    digest = [hashlib.sha256(b"".join(w[k].tobytes() for k in sorted(w))).hexdigest() for w in (wa, wb)]
    loss = [{r["step"]: r["train_loss"] for r in outputs.read_jsonl(os.path.join(d, "metrics.jsonl"))
             if "train_loss" in r} for d in (a, b)]  # fmt: skip
    steps = sorted(set(loss[0]) & set(loss[1]))
    diffs = [abs(loss[0][s] - loss[1][s]) for s in steps]
    first = next((s for s, d in zip(steps, diffs, strict=True) if d != 0), None)
    relative = {
        k: float(np.max(np.abs(wa[k] - wb[k])) / max(float(np.max(np.abs(wa[k]))), 1e-30)) for k in wa
    }
    worst = max(relative, key=relative.get)
    absolute = {k: float(np.max(np.abs(wa[k] - wb[k]))) for k in wa}
    largest = max(absolute, key=absolute.get)
    return {"bitwise_equal": digest[0] == digest[1],
            "max_weight_difference": absolute[largest], "largest_in": largest,
            "max_relative_weight_difference": relative[worst], "largest_relative_in": worst,
            "max_loss_difference": float(max(diffs)) if diffs else None, "first_differing_step": first,
            "steps": len(steps)}  # fmt: skip


DETERMINISM_RUNS = ("jax-a", "jax-b", "jax-2dev", "torch-a", "torch-b")


def two_cpu_devices() -> dict:
    """The environment of a subprocess that sees 2 CPU devices (the XLA flags already set kept)."""
    return {
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    }


def first_step_divergence(config: str, shards: str, seed: int, overrides: dict, path: str) -> dict:
    """``calcjax.research.device_divergence`` (the first train step on 1 and on 2 CPU devices, quantity by
    quantity) in a subprocess with 2 CPU devices, written to ``path`` (kept: not run again)."""
    if not os.path.exists(path):
        flags = {"data.shards": shards, "train.seed": seed, "data.seed": seed, **overrides}
        cmd = [sys.executable, "-m", "calcjax.research.device_divergence",
               f"--config={os.path.join(ROOT, config)}", f"--out={path}",
               *[f"--config.{k}={v}" for k, v in flags.items()]]  # fmt: skip
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, **two_cpu_devices()})  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"the 1-against-2-device comparison failed:\n{run.stderr[-3000:]}")
    with open(path) as f:
        return json.load(f)


def determinism_figures(base: str, steps: int, divergence: dict) -> dict:
    """The comparisons of the determinism runs under ``base`` (:data:`DETERMINISM_RUNS`)."""
    runs = {name: os.path.join(base, name) for name in DETERMINISM_RUNS}
    return {"steps": steps, "jax_repeat": compare_runs(runs["jax-a"], runs["jax-b"]),
            "torch_repeat": compare_runs(runs["torch-a"], runs["torch-b"]),
            "jax_1_vs_2_devices": compare_runs(runs["jax-a"], runs["jax-2dev"]),
            "first_step_1_vs_2_devices": divergence}  # fmt: skip


def determinism(args, overrides: dict) -> dict:
    """The first seed trained again for a few steps: JAX twice, PyTorch twice, JAX on 2 CPU devices (the
    JAX runs on XLA's convolutions); and the first step on 1 and 2 devices compared quantity by quantity
    (:func:`first_step_divergence`)."""
    n = args.determinism_steps
    short = {**overrides, "train.steps": n, "train.log_every": 1, "train.eval_every": 10 * n,
             "train.checkpoint_every": n, "train.warmup_steps": max(1, n // 10)}  # fmt: skip
    seed, base = args.seeds[0], os.path.join(args.out, "determinism")
    for name in DETERMINISM_RUNS:
        env = two_cpu_devices() if name == "jax-2dev" else {}
        if name.startswith("jax"):
            # XLA's kernels on 1 device too (a CPU with several devices always uses them,
            # calcjax.model.cpu_kernels): the 1-against-2 comparison then isolates the reduction.
            env[CPU_KERNELS_ENV] = "xla"
        train(name.split("-")[0], args.config, args.shards, seed, os.path.join(base, name), short, env)
    divergence = first_step_divergence(args.config, args.shards, seed, overrides,
                                       os.path.join(base, "first_step_1_vs_2_devices.json"))  # fmt: skip
    return determinism_figures(base, n, divergence)


def run_folders(out: str, seeds: list[int]) -> dict[str, list[str]]:
    """Each framework's training run folders under ``out``, in the order of ``seeds``."""
    return {fw: [os.path.join(out, "runs", fw, f"seed-{s}") for s in seeds] for fw in FRAMEWORKS}


def throughput(workdirs: dict[str, list[str]]) -> dict:
    """Per framework, the spread over its runs of their steps/s (:func:`steps_per_s`; 0 where unlogged)."""
    return {fw: spread([steps_per_s(d) or 0.0 for d in workdirs[fw]]) for fw in FRAMEWORKS}


def recipe_steps(overrides: dict, workdir: str) -> int:
    """The recipe's training steps: the override, else the run's own config (``workdir/config.json``)."""
    if overrides.get("train.steps"):
        return int(overrides["train.steps"])
    with open(os.path.join(workdir, "config.json")) as f:
        return int(json.load(f)["train"]["steps"])


def study(args) -> dict:
    """Every run, score and figure of the study (module docstring)."""
    overrides = dict(o.split("=", 1) for o in args.override)
    workdirs = run_folders(args.out, args.seeds)
    seconds, scored = {}, {fw: {} for fw in FRAMEWORKS}
    for fw, seed in itertools.product(FRAMEWORKS, args.seeds):
        d = workdirs[fw][args.seeds.index(seed)]
        seconds[(fw, seed)] = train(fw, args.config, args.shards, seed, d, overrides)
        scored[fw][seed] = score(d, args.shards, os.path.join(args.out, "scores", f"{fw}-seed-{seed}"))
    per_run = {fw: {s: run_figures(scored[fw][s]) for s in args.seeds} for fw in FRAMEWORKS}
    per_framework = {
        fw: {k: spread([per_run[fw][s][k] for s in args.seeds]) for k in FIGURES} for fw in FRAMEWORKS
    }
    return {
        "config": args.config, "overrides": overrides, "seeds": args.seeds, "margin": args.margin,
        "per_run": per_run, "per_framework": per_framework, "agreement": agreements(scored),
        "equivalence": tost([per_run["jax"][s]["voxel_f1"] for s in args.seeds],
                            [per_run["torch"][s]["voxel_f1"] for s in args.seeds], args.margin),
        "loss_curves": loss_curves(workdirs, os.path.join(args.out, "loss_curves.png")),
        "steps_per_s": throughput(workdirs),
        "recipe_steps": recipe_steps(overrides, workdirs["jax"][0]),
        "seconds_per_run": {fw: spread([seconds[(fw, s)] for s in args.seeds]) for fw in FRAMEWORKS},
        "determinism": determinism(args, overrides) if args.determinism_steps else None,
        "commit": _commit(), "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m calcjax.research.repro", *args.argv]),
    }  # fmt: skip


def report_again(args) -> dict:
    """``OUT/study.json``'s runs and figures, with what can be computed again from the runs' logs, weights
    and scores done again (steps/s, the recipe's steps, the agreement, the determinism comparisons): what
    ``--doc_only`` reports."""
    path = os.path.join(args.out, "study.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no finished study to report (run it without --doc_only first)")
    with open(path) as f:
        r = json.load(f)
    workdirs = run_folders(args.out, r["seeds"])
    r["steps_per_s"] = throughput(workdirs)
    r["recipe_steps"] = recipe_steps(r["overrides"], workdirs["jax"][0])
    scored = {fw: {s: outputs.read_jsonl(os.path.join(args.out, "scores", f"{fw}-seed-{s}", outputs.SCORES))
                   for s in r["seeds"]} for fw in FRAMEWORKS}  # fmt: skip
    r["agreement"] = agreements(scored)
    if r["determinism"]:
        base = os.path.join(args.out, "determinism")
        divergence = first_step_divergence(r["config"], args.shards, r["seeds"][0], r["overrides"],
                                           os.path.join(base, "first_step_1_vs_2_devices.json"))  # fmt: skip
        r["determinism"] = determinism_figures(base, r["determinism"]["steps"], divergence)
    r["reported_at"] = _commit()
    return r


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m calcjax.research.repro", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shipped.py", help="the recipe (a config file)")
    p.add_argument("--shards", required=True, help="a shard folder with train, val and test splits")
    p.add_argument("--out", required=True, help="output folder (runs, scores, study.json)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument(
        "--margin", type=float, default=0.05, help="equivalence margin on voxel F1, set beforehand"
    )
    p.add_argument(
        "--determinism_steps", type=int, default=20, help="steps of the determinism runs (0: none)"
    )
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE config override (repeatable)")
    p.add_argument("--doc", default="", help="write the report here (e.g. docs/reproducibility.md)")
    p.add_argument("--doc_only", action="store_true", help="only write --doc again from OUT/study.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.seeds, args.argv = [int(s) for s in args.seeds.split(",")], argv

    def job() -> dict:
        compile_cache.enable()
        os.makedirs(args.out, exist_ok=True)
        result = report_again(args) if args.doc_only else study(args)
        write_atomic(os.path.join(args.out, "study.json"), json.dumps(result, indent=1) + "\n")
        if args.doc:
            write_doc(result, args.doc, os.path.join(args.out, "loss_curves.png"))
        return result

    result = cli.run_or_exit("calcjax.research.repro", job, (FileNotFoundError, RuntimeError))
    print(
        json.dumps(
            {"verdict": result["equivalence"]["verdict"], **result["per_framework"]["jax"]["voxel_f1"]}
        )
    )


if __name__ == "__main__":
    main()
