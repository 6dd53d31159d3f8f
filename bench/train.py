"""Training throughput of configs/smoke.py on 1 and 2 CPU devices, and the input pipeline alone.

  python bench/train.py [--steps 30] [--shards DIR]

Prints one JSON line per figure: ``train_step`` steps/s and slices/s for the jitted data-parallel step
(global batch ``train.batch_size``, crops ``data.crop``) on a ``('data',)`` mesh of 1 and of 2 CPU devices
(each measured in a fresh process with ``--xla_force_host_platform_device_count``), with the batches
already in memory; ``input_pipeline`` batches/s of the grain training stream alone; and
``loader_over_step``: pipeline batches/s over the 1-device step rate (the aim: >= 3); and
``ema_step_over_plain``: the 1-device step rate with ``train.ema_decay`` (moving averages of the weights
updated inside the step) over the plain step's, both measured by this command (the aim: >= 0.9). Without
``--shards`` it writes 12 phantom scans (256x256) and builds shards in a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP_SCRIPT = """
import json, sys, time, numpy as np, jax
from flax import nnx
from calcjax.model import network as M
from calcjax.train import step as ts
from calcjax.core import sharding
from calcjax.data import input_pipeline as ip
from configs import smoke
c = smoke.get_config()
split = ip.ShardSplit.load(sys.argv[1], "train")
it = iter(ip.train_dataset(split, batch_size=c.train.batch_size, aug=ip.AugmentConfig.from_config(c.data),
                           calcium_fraction=c.data.calcium_fraction, seed=0))
batches = [next(it) for _ in range(4)]
model = M.new_model(M.ModelConfig.from_config(c.model), 0)
tx = ts.make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=1000, weight_decay=1e-4,
                       grad_clip=1.0)
ema_decay = float(sys.argv[3])
graphdef, state = ts.create_state(model, tx, ema=ema_decay > 0)
mesh = sharding.make_mesh()
rep, dat = sharding.replicated(mesh), sharding.data_sharding(mesh)
state = jax.device_put(state, rep)
step = ts.make_train_step(graphdef, tx, ts.LossConfig.from_config(c.loss), ema_decay=ema_decay,
                          in_shardings=(rep, dat, dat), out_shardings=(rep, rep))
gl = [sharding.to_global({"images": b["images"], "labels": b["labels"]}, mesh) for b in batches]
state, m = step(state, gl[0]["images"], gl[0]["labels"]); m["loss"].block_until_ready()
n = int(sys.argv[2])
t0 = time.perf_counter()
for i in range(n):
    g = gl[i % len(gl)]
    state, m = step(state, g["images"], g["labels"])
m["loss"].block_until_ready()
dt = time.perf_counter() - t0
print(json.dumps({"devices": jax.device_count(), "steps_per_s": n / dt,
                  "slices_per_s": n * c.train.batch_size / dt, "batch": c.train.batch_size,
                  "crop": c.data.crop, "ema_decay": ema_decay}))
"""


def make_shards(tmp: str) -> str:
    from data_prep import builder
    from data_prep.phantom.generator import generate_scan, protocol_of, write_scan

    for i in range(12):
        write_scan(
            generate_scan(2, i, protocol_of(i, "mixed"), size=256), os.path.join(tmp, "in"), seed=2, index=i
        )
    builder.build(
        builder.BuildOptions(
            os.path.join(tmp, "in"), os.path.join(tmp, "shards"), split="train=1", progress=False
        )
    )
    return os.path.join(tmp, "shards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shards", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(tmp)
        rates = {}
        for devices, ema_decay in ((1, 0.0), (2, 0.0), (1, 0.998)):
            env = {
                **os.environ,
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "PYTHONPATH": ROOT,
            }
            out = subprocess.run(
                [sys.executable, "-c", STEP_SCRIPT, shards, str(args.steps), str(ema_decay)],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rates[devices, ema_decay] = r["steps_per_s"]
            print(json.dumps({"bench": "train", "figure": "train_step", "config": "smoke", **r}))
        from calcjax.data import input_pipeline as ip
        from configs import smoke

        c = smoke.get_config()
        split = ip.ShardSplit.load(shards, "train")
        it = iter(
            ip.train_dataset(
                split,
                batch_size=c.train.batch_size,
                aug=ip.AugmentConfig.from_config(c.data),
                calcium_fraction=c.data.calcium_fraction,
                seed=0,
            )
        )
        next(it)
        n = 60
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        loader = n / (time.perf_counter() - t0)
        print(
            json.dumps(
                {
                    "bench": "train",
                    "figure": "input_pipeline",
                    "batches_per_s": round(loader, 2),
                    "batch": c.train.batch_size,
                    "crop": c.data.crop,
                    "threads": 2,
                }
            )
        )
        print(
            json.dumps(
                {"bench": "train", "figure": "loader_over_step", "value": round(loader / rates[1, 0.0], 2)}
            )
        )
        print(
            json.dumps(
                {
                    "bench": "train",
                    "figure": "ema_step_over_plain",
                    "value": round(rates[1, 0.998] / rates[1, 0.0], 3),
                }
            )
        )


if __name__ == "__main__":
    main()
