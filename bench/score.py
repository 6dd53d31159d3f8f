"""Scorer throughput for configs/smoke.py and configs/default.py on this machine, and its overhead.

  python bench/score.py [--scans 2] [--default_scans 1] [--size 512] [--ensemble 3]
  python bench/score.py --pipeline [--real $CALCJAX_REAL_DATA] [--copies 3] [--host_copies 8] [--workers 2] \
      [--dicom DIR --limit N]

``--pipeline``: the pipelined scorer and the forward pass in the heart box against the serial scorer on the
real chest scans (``bench/score_pipeline.py`` says what each figure is); the lines below are not printed.

For each config: a checkpoint of a freshly initialised model (speed does not depend on the weights), a
shard folder of ``--scans`` cardiac phantoms at ``--size`` x ``--size`` (45-50 slices each), and
``calcjax.score.cohort.score_cohort`` over it twice with one compiled predictor: the first run includes
compilation, the second is the steady state. One JSON line per config with ``slices_per_s``,
``scans_per_min``, ``forward_s`` (time inside the jitted forward: host -> device, forward, labels back),
``total_s`` and ``outside_forward_fraction`` = 1 - forward_s / total_s (reading, stacking, Agatston,
metrics, writing, and the report with its default 1000 bootstrap resamples, as users run it; the aim:
under 0.25), all from the warm run, plus ``first_run_s``. ``--ensemble K`` adds a line for an ensemble
model file of K smoke models (``calcjax.model.network.Ensemble``, as ``python -m calcjax.model.files
--checkpoint
A,B,C`` writes one) scored the same way, with ``slices_per_s_vs_one``: its throughput over the single
model's in the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_shards(tmp: str, scans: int, size: int) -> str:
    from data_prep import builder
    from data_prep.phantom.generator import generate_scan, write_scan

    for i in range(scans):
        scan = generate_scan(4, 2 * i, "cardiac", size=size, target_category=(i % 4) + 1)
        write_scan(scan, os.path.join(tmp, "in"), seed=4, index=2 * i)
    out = os.path.join(tmp, "shards")
    builder.build(builder.BuildOptions(os.path.join(tmp, "in"), out, split="test=1", progress=False))
    return out


def fresh_checkpoint(run: str, config) -> None:
    import optax

    from calcjax.model import network as model_lib
    from calcjax.train import checkpoint as train_checkpoint
    from calcjax.train import step as ts
    from calcjax.train.loop import _to_dict

    model = model_lib.new_model(model_lib.ModelConfig.from_config(config.model), 0)
    _, state = ts.create_state(model, optax.sgd(0.1))
    ckpt = train_checkpoint.Checkpointer(run, async_save=False)
    ckpt.save_best(state, _to_dict(config), {"val_voxel_f1": 0.0})
    ckpt.close()


def bench(name: str, config, tmp: str, scans: int, size: int, batch_size: int, members: int = 1) -> dict:
    import jax

    from calcjax.inference import predictor as inference
    from calcjax.model import checkpoint
    from calcjax.model import export as model_export
    from calcjax.score import cohort as score
    from calcjax.score.options import ScoreOptions

    run = os.path.join(tmp, f"run_{name}")
    shards = os.path.join(tmp, f"data_{name}")
    if not os.path.isdir(run):  # an ensemble line reuses its single model's checkpoint and phantoms
        fresh_checkpoint(run, config)
        make_shards(shards, scans, size)
    shards = os.path.join(shards, "shards")
    if members > 1:
        path = os.path.join(tmp, f"{name}_x{members}.msgpack")
        model_export.export([run] * members, "best", path)  # speed does not depend on the weights
        run, name = path, f"{name}_ensemble{members}"
    _, model = checkpoint.load_for_inference(run, "best")
    predictor = inference.Predictor(model, batch_size=batch_size)
    # The scorer's defaults, as a user runs it: the report with 1000 bootstrap resamples included.
    kw = dict(checkpoint_path=run, shards=shards + "/test-*", progress=False)
    t0 = time.perf_counter()
    score.score_cohort(ScoreOptions(out=os.path.join(tmp, f"out_{name}_1"), **kw), predictor=predictor)
    first_s = time.perf_counter() - t0
    f0 = predictor.forward_seconds
    t0 = time.perf_counter()
    warm = score.score_cohort(ScoreOptions(out=os.path.join(tmp, f"out_{name}_2"), **kw), predictor=predictor)
    total = time.perf_counter() - t0  # the whole call: scans, CSV and the report
    forward = predictor.forward_seconds - f0
    slices = round(warm["slices_per_s"] * warm["seconds"])
    return {
        "bench": "score",
        "config": name,
        "members": members,
        "backend": jax.default_backend(),
        "devices": predictor.mesh.size,
        "size": size,
        "scans": warm["scored"],
        "slices": slices,
        "batch_size": predictor.batch_size,
        "compute_dtype": config.model.dtype,
        "slices_per_s": round(slices / total, 3),
        "scans_per_min": round(60 * warm["scored"] / total, 3),
        "forward_s": round(forward, 3),
        "report_s": round(total - warm["seconds"], 3),
        "total_s": round(total, 3),
        "outside_forward_fraction": round(1.0 - forward / total, 4),
        "first_run_s": round(first_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=2, help="phantom scans for configs/smoke.py")
    parser.add_argument("--default_scans", type=int, default=1, help="phantom scans for configs/default.py")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--ensemble", type=int, default=0, help="members of an extra smoke ensemble line")
    parser.add_argument("--pipeline", action="store_true", help="bench/score_pipeline.py's line instead")
    parser.add_argument(
        "--real", default=os.environ.get("CALCJAX_REAL_DATA") or os.path.join(ROOT, "..", "shared", "data")
    )
    parser.add_argument("--copies", type=int, default=3, help="--pipeline: copies of each real chest series")
    parser.add_argument("--workers", type=int, default=2, help="--pipeline: the pipelined scorer's workers")
    parser.add_argument(
        "--host_copies", type=int, default=8, help="--pipeline: copies of each series for the host-only runs"
    )
    parser.add_argument("--dicom", default="", help="--pipeline: score this folder's scans instead")
    parser.add_argument("--limit", type=int, default=8, help="--pipeline --dicom: its first N scan folders")
    args = parser.parse_args()
    from absl import logging

    from configs import default, smoke

    logging.set_verbosity(logging.WARNING)
    if args.pipeline:
        from bench import score_pipeline
        from calcjax.core import compile_cache

        compile_cache.enable()
        with tempfile.TemporaryDirectory() as tmp:
            print(
                json.dumps(
                    score_pipeline.run(
                        args.real,
                        args.copies,
                        args.workers,
                        tmp,
                        args.host_copies,
                        args.dicom,
                        args.limit,
                        emit=lambda row: print(json.dumps(row), flush=True),
                    )
                ),
                flush=True,
            )
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, scans in (
            ("smoke", smoke.get_config(), args.scans),
            ("default", default.get_config(), args.default_scans),
        ):
            if not scans:
                continue
            one = bench(name, config, tmp, scans, args.size, args.batch_size)
            print(json.dumps(one), flush=True)
            if name == "smoke" and args.ensemble > 1:
                ens = bench(name, config, tmp, scans, args.size, args.batch_size, members=args.ensemble)
                ens["slices_per_s_vs_one"] = round(ens["slices_per_s"] / one["slices_per_s"], 3)
                print(json.dumps(ens), flush=True)


if __name__ == "__main__":
    main()
