"""The train step of a config on one accelerator, JAX and the PyTorch twin in the same run.

  python bench/gpu_step.py [--config default] [--size 512] [--batch 8] [--steps 10] \
      [--peak_tflops 989 --peak_tflops_f32 67] [--torch_variants eager,channels_last,compile]

For float32 and bfloat16 compute: JAX's jitted train step (``calcjax.train.step``) and the PyTorch twin's
model in a step under the same conditions (:func:`time_torch_step`: batch resident on the device, no host
sync inside the step, fused AdamW; eager, channels-last and ``torch.compile`` variants; bfloat16 through
``torch.autocast``) on the same random batch, after warm-up. One JSON line per (framework, dtype):
seconds per step, slices/s, the step's FLOPs (XLA cost analysis of the JAX step; the same model FLOPs are
used for the twin) and model FLOP
utilisation = FLOPs / s / peak (``--peak_tflops``: the accelerator's dense peak for that dtype, e.g. H100
SXM 989 for bf16 and 67 for f32 without TF32; 0 leaves MFU out). The JAX row also gives ``compile_s`` (the
step is compiled once, ahead of time, and that executable is timed). ``--no_torch`` / ``--no_jax`` time one
framework (``--no_jax``: no FLOP count, so no MFU). Runs on whatever device jax and torch find (``cuda``
when present), so it can be tried on CPU with a small ``--size``.
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
    p.add_argument("--no_jax", action="store_true", help="time the PyTorch twin only (no MFU: no FLOP count)")
    p.add_argument(
        "--torch_variants",
        default="eager,channels_last,compile",
        help="PyTorch steps to time: eager, channels_last (NHWC memory), compile (torch.compile)",
    )
    args = p.parse_args()

    import importlib

    import jax
    import numpy as np
    import torch

    from calcjax.model import network as M
    from calcjax.train import step as ts

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
        model = M.new_model(M.ModelConfig.from_config(c.model), 0)
        tx = ts.make_optimizer(
            learning_rate=1e-4, warmup_steps=1, total_steps=1000, weight_decay=1e-4, grad_clip=1.0
        )
        emit = _emitter(args, 0.0, peak, dtype, jax.devices()[0].device_kind, torch_device)
        if not args.no_jax:
            graphdef, state = ts.create_state(model, tx)
            step = ts.make_train_step(graphdef, tx, ts.LossConfig.from_config(c.loss))
            x, y = jax.device_put(images), jax.device_put(labels)
            t0 = time.perf_counter()
            compiled = step.lower(state, x, y).compile()  # called directly below: compiled once
            compile_s = time.perf_counter() - t0
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops = float(cost.get("flops", 0.0))
            state, m = compiled(state, x, y)  # warm-up
            m["loss"].block_until_ready()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = compiled(state, x, y)
            m["loss"].block_until_ready()
            dt = (time.perf_counter() - t0) / args.steps
            emit = _emitter(args, flops, peak, dtype, jax.devices()[0].device_kind, torch_device)
            emit("jax", dt, compile_s=round(compile_s, 1))  # at once: a slow torch.compile cannot lose it
        if not args.no_torch:
            for variant in args.torch_variants.split(","):
                try:
                    c32 = importlib.import_module(f"configs.{args.config}").get_config()  # f32 weights
                    sec = time_torch_step(c32, images, labels, dtype, variant, args.steps, torch_device)
                except Exception as e:  # e.g. torch.compile without a working compiler here
                    print(
                        json.dumps(
                            {
                                "bench": "train_step_one_device",
                                "framework": f"torch-{variant}",
                                "dtype": dtype,
                                "error": f"{e.__class__.__name__}: {str(e)[:200]}",
                            }
                        ),
                        flush=True,
                    )
                    continue
                emit(f"torch-{variant}", sec)


def _emitter(args, flops: float, peak: float, dtype: str, jax_device: str, torch_device: str):
    """A function printing one JSON line for (framework, seconds per step) of this dtype."""

    def emit(framework: str, sec: float, **extra) -> None:
        out = {
            "bench": "train_step_one_device",
            "framework": framework,
            "device": jax_device if framework == "jax" else torch_device,
            "config": args.config,
            "size": args.size,
            "batch": args.batch,
            "dtype": dtype,
            "seconds_per_step": round(sec, 5),
            "slices_per_s": round(args.batch / sec, 2),
        }
        if flops:
            out["step_gflop"] = round(flops / 1e9, 1)
        if peak and flops:
            out["mfu"] = round(flops / sec / (peak * 1e12), 4)
        print(json.dumps({**out, **extra}), flush=True)

    return emit


def time_torch_step(config, images, labels, dtype: str, variant: str, steps: int, device: str) -> float:
    """Seconds per PyTorch train step under the conditions the JAX step has: the batch already on the
    device, no host synchronisation inside the step (no ``.item()``: clipping and the non-finite guard stay
    on the device, as ``optax`` and ``calcjax.train.step`` keep them), fused / foreach AdamW, optionally
    channels-last memory and ``torch.compile``; bfloat16 through ``torch.autocast``. The same work as the
    JAX step (forward, bootstrap-IoU loss, backward, global-norm clip, AdamW); the exact numerics of the
    twin (BatchNorm variance rule, skipped-step bookkeeping) are held by tests, not timed here."""
    import numpy as np
    import torch

    from calcjax.research.torch_baseline import losses as torch_losses
    from calcjax.research.torch_baseline import train as torch_train
    from calcjax.train import step as ts

    _, model = torch_train.initial_models(config, 0)
    model = model.to(device).train()
    memory = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1))).to(device)
    x = x.contiguous(memory_format=memory)
    y = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, **fused)
    loss_kwargs = ts.LossConfig.from_config(config.loss).kwargs()
    clip = float(config.train.grad_clip)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(x)
        loss = torch_losses.bootstrap_iou_loss(logits.float(), y, **loss_kwargs)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)  # no host sync
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        torch._foreach_mul_([p.grad for p in params], finite.to(params[0].dtype))  # on-device guard
        opt.step()
        return loss

    run = torch.compile(step) if variant == "compile" else step

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up (and compilation)
        run()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    return (time.perf_counter() - t0) / steps


if __name__ == "__main__":
    main()
