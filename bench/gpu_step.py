"""The train step of a config on one accelerator, JAX and the PyTorch twin in the same run.

  python bench/gpu_step.py [--config default] [--size 512] [--batch 8] [--steps 10] [--peak_tflops 989]

For float32 and bfloat16 compute: JAX's jitted train step (``calcjax.train_step``) and the PyTorch twin's
(``calcjax.torch_baseline.train.TorchTrainer``; bfloat16 through ``torch.autocast``) on the same random
batch, after warm-up. One JSON line per (framework, dtype): seconds per step, slices/s, the step's FLOPs
(XLA cost analysis of the JAX step; the same model FLOPs are used for the twin) and model FLOP
utilisation = FLOPs / s / peak (``--peak_tflops``: the accelerator's dense peak for that dtype, e.g. H100
SXM 989 for bf16 and 67 for f32 without TF32; 0 leaves MFU out). Runs on whatever device jax and torch find
(``cuda`` when present), so it can be tried on CPU with a small ``--size``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default", choices=["default", "smoke"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 dense peak (TFLOP/s)")
    p.add_argument("--peak_tflops_f32", type=float, default=0.0, help="f32 dense peak (TFLOP/s)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no_torch", action="store_true")
    args = p.parse_args()

    import importlib

    import jax
    import numpy as np
    import torch
    from flax import nnx

    from calcjax import model as M
    from calcjax import train_step as ts
    from calcjax.torch_baseline import train as torch_train

    rng = np.random.default_rng(0)
    images = rng.normal(0, 400, size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = (rng.uniform(size=images.shape[:3]) < 0.01).astype(np.int32) * rng.integers(
        1, 5, images.shape[:3]
    )
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in args.dtypes.split(","):
        c = importlib.import_module(f"configs.{args.config}").get_config()
        c.model.dtype = dtype
        peak = args.peak_tflops if dtype == "bfloat16" else args.peak_tflops_f32
        model = M.DenseRAUnet(M.ModelConfig.from_config(c.model), rngs=nnx.Rngs(0))
        tx = ts.make_optimizer(
            learning_rate=1e-4, warmup_steps=1, total_steps=1000, weight_decay=1e-4, grad_clip=1.0
        )
        graphdef, state = ts.create_state(model, tx)
        step = ts.make_train_step(graphdef, tx, ts.LossConfig.from_config(c.loss))
        x, y = jax.device_put(images), jax.device_put(labels)
        compiled = step.lower(state, x, y).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0))
        state, m = step(state, x, y)
        m["loss"].block_until_ready()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, x, y)
        m["loss"].block_until_ready()
        dt = (time.perf_counter() - t0) / args.steps
        rows = [("jax", dt)]
        if not args.no_torch:
            c32 = importlib.import_module(f"configs.{args.config}").get_config()
            _, twin = torch_train.initial_models(c32, 0)
            trainer = torch_train.TorchTrainer(twin, c32, torch_device)
            ctx = (
                torch.autocast(device_type=torch_device, dtype=torch.bfloat16)
                if dtype == "bfloat16"
                else torch.autocast(device_type=torch_device, enabled=False)
            )
            with ctx:
                trainer.step(images, labels)
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainer.step(images, labels)
                if torch_device == "cuda":
                    torch.cuda.synchronize()
            rows.append(("torch", (time.perf_counter() - t0) / args.steps))
        for framework, sec in rows:
            out = {
                "bench": "train_step_one_device",
                "framework": framework,
                "device": jax.devices()[0].device_kind if framework == "jax" else torch_device,
                "config": args.config,
                "size": args.size,
                "batch": args.batch,
                "dtype": dtype,
                "seconds_per_step": round(sec, 5),
                "slices_per_s": round(args.batch / sec, 2),
                "step_gflop": round(flops / 1e9, 1),
            }
            if peak:
                out["mfu"] = round(flops / sec / (peak * 1e12), 4)
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
