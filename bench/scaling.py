"""Train-step throughput of configs/smoke.py on 1, 2, 4 and 8 (fake) CPU devices for a fixed global batch.

  python bench/scaling.py [--steps 20] [--batch 8] [--crop 96] [--devices 1,2,4,8]

Each device count runs in a fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``: the
jitted data-parallel step (batch sharded on ``('data',)``, state replicated) on the same global batch.
One JSON line per count: steps/s, slices/s, and ``ratio_vs_1_device``. On this 2-core machine the fake
devices share the same cores, so this is a correctness-of-scaling figure (the sharded program compiles,
runs and costs about the same), not a speed claim.

With a CUDA jax, ``--gpu`` also times configs/default.py at 512x512 on one GPU in float32 and bfloat16
(slices/s and model FLOP utilisation against ``--peak_tflops`` for bfloat16 and ``--peak_tflops_f32`` for
float32, both required) next to the PyTorch twin under the same conditions in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))

STEP = r"""
import json, sys, time, numpy as np, jax
from flax import nnx
from calcjax.model import network as M
from calcjax.train import step as ts
from calcjax.core import sharding
from configs import smoke
steps, batch, crop = (int(a) for a in sys.argv[1:4])
c = smoke.get_config()
rng = np.random.default_rng(0)
images = rng.normal(0, 400, size=(batch, crop, crop, 3)).astype(np.float32)
shape = (batch, crop, crop)
labels = (rng.uniform(size=shape) < 0.02).astype(np.int32) * rng.integers(1, 5, shape)
model = M.new_model(M.ModelConfig.from_config(c.model), 0)
tx = ts.make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=1000, weight_decay=1e-4,
                       grad_clip=1.0)
graphdef, state = ts.create_state(model, tx)
mesh = sharding.make_mesh()
rep, dat = sharding.replicated(mesh), sharding.data_sharding(mesh)
state = jax.device_put(state, rep)
step = ts.make_train_step(graphdef, tx, ts.LossConfig.from_config(c.loss), in_shardings=(rep, dat, dat),
                          out_shardings=(rep, rep))
g = sharding.to_global({"images": images, "labels": labels}, mesh)
state, m = step(state, g["images"], g["labels"]); m["loss"].block_until_ready()
t0 = time.perf_counter()
for _ in range(steps):
    state, m = step(state, g["images"], g["labels"])
m["loss"].block_until_ready()
dt = time.perf_counter() - t0
print(json.dumps({"devices": jax.device_count(), "steps_per_s": steps / dt,
                  "slices_per_s": steps * batch / dt, "loss": float(m["loss"])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--gpu", action="store_true", help="also run bench/gpu_step.py on the GPU")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the GPU's bf16 dense peak (TFLOP/s)")
    parser.add_argument(
        "--peak_tflops_f32", type=float, default=0.0, help="the GPU's f32 dense peak (TFLOP/s)"
    )
    args = parser.parse_args()
    base = None
    for n in (int(x) for x in args.devices.split(",")):
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
            "PYTHONPATH": ROOT,
            "JAX_PLATFORMS": "cpu",
        }
        p = subprocess.run(
            [sys.executable, "-c", STEP, str(args.steps), str(args.batch), str(args.crop)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(p.stdout.strip().splitlines()[-1])
        base = base or r["steps_per_s"]
        print(
            json.dumps(
                {
                    "bench": "scaling",
                    "config": "smoke",
                    "backend": "cpu",
                    "global_batch": args.batch,
                    "crop": args.crop,
                    **r,
                    "ratio_vs_1_device": r["steps_per_s"] / base,
                }
            ),
            flush=True,
        )
    if args.gpu:
        if not (args.peak_tflops and args.peak_tflops_f32):
            parser.error(
                "--gpu needs --peak_tflops and --peak_tflops_f32 (e.g. H100 SXM: 989 and 67) for MFU"
            )
        cmd = [
            sys.executable,
            os.path.join(ROOT, "bench", "gpu_step.py"),
            "--peak_tflops",
            str(args.peak_tflops),
            "--peak_tflops_f32",
            str(args.peak_tflops_f32),
        ]
        subprocess.run(cmd, cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
