"""DenseRAUnet speed on this CPU, JAX (jitted) next to its PyTorch twin (one JSON line per figure).

  python bench/model.py [--configs smoke,default] [--repeats 3] [--torch_compile]

For configs/smoke.py at 128x128 and configs/default.py at 512x512, batch 4, float32: median seconds of the
forward pass (eval mode) and of a train step (forward + backward + AdamW update), for JAX (``jax.jit``,
state donated) and PyTorch (eager, and ``torch.compile`` with ``--torch_compile``), the ratio JAX / PyTorch
(< 1: JAX faster), and the achieved GFLOP/s from XLA's FLOP count of the forward pass (a train step counted
as 3x the forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from calcjax.model import network as jmodel
from calcjax.research.torch_baseline import convert
from calcjax.research.torch_baseline import losses as tlosses
from calcjax.research.torch_baseline import model as tmodel
from calcjax.train import step as ts
from configs import default, smoke

SETUPS = {"smoke": (smoke, 128), "default": (default, 512)}
BATCH = 4


def timed(fn, repeats):
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name, repeats, torch_compile):
    cfg_module, size = SETUPS[name]
    cfg = cfg_module.get_config()
    cfg.model.dtype = "float32"
    mcfg = jmodel.ModelConfig.from_config(cfg.model)
    loss_cfg = ts.LossConfig.from_config(cfg.loss)
    rng = np.random.default_rng(0)
    x = rng.normal(40, 300, size=(BATCH, size, size, mcfg.in_channels)).astype(np.float32)
    y = rng.integers(0, mcfg.num_classes, size=(BATCH, size, size))
    net = jmodel.DenseRAUnet(mcfg, rngs=nnx.Rngs(0))
    flops = jmodel.flops_per_slice(net, size, size) * BATCH
    tnet = tmodel.DenseRAUnet(mcfg)
    tnet.load_state_dict(convert.jax_to_torch(net))
    tx = ts.make_optimizer(
        learning_rate=1e-3, warmup_steps=10, total_steps=1000, weight_decay=1e-4, grad_clip=1.0
    )
    graphdef, state = ts.create_state(net, tx)
    eval_fn = jax.jit(lambda p, s, im: ts.eval_logits(graphdef, p, s, im))
    step = ts.make_train_step(graphdef, tx, loss_cfg)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    holder = {"state": state}

    def jax_forward():
        eval_fn(holder["state"].params, holder["state"].batch_stats, xj).block_until_ready()

    def jax_train():
        holder["state"], m = step(holder["state"], xj, yj)
        m["loss"].block_until_ready()

    xt, yt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
    opt = torch.optim.AdamW(tnet.parameters(), lr=1e-3, weight_decay=1e-4)
    variants = {"eager": tnet}
    if torch_compile:
        variants["compile"] = torch.compile(tnet)
    results = {"jax": (timed(jax_forward, repeats), timed(jax_train, repeats))}
    for label, module in variants.items():

        def torch_forward(module=module):
            module.eval()
            with torch.no_grad():
                module(xt)

        def torch_train(module=module):
            module.train()
            opt.zero_grad(set_to_none=True)
            loss = tlosses.bootstrap_iou_loss(
                module(xt), yt, rho=loss_cfg.rho, k_min=loss_cfg.k_min, lam=loss_cfg.lam
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()

        try:
            results[f"torch_{label}"] = (timed(torch_forward, repeats), timed(torch_train, repeats))
        except Exception as e:  # torch.compile may not work on every machine
            print(
                json.dumps(
                    {"bench": "model", "config": name, "framework": f"torch_{label}", "error": str(e)[:200]}
                )
            )
    common = {
        "bench": "model",
        "config": name,
        "input": [BATCH, size, size, mcfg.in_channels],
        "dtype": "float32",
        "params": jmodel.parameter_count(net),
        "gflop_forward": round(flops / 1e9, 2),
    }
    for fw, (fwd, train) in results.items():
        print(
            json.dumps(
                {
                    **common,
                    "framework": fw,
                    "seconds_forward": round(fwd, 4),
                    "seconds_train_step": round(train, 4),
                    "gflops_per_s_forward": round(flops / fwd / 1e9, 1),
                    "gflops_per_s_train": round(3 * flops / train / 1e9, 1),
                }
            )
        )
    for fw in results:
        if fw != "jax":
            print(
                json.dumps(
                    {
                        **common,
                        "figure": f"jax_over_{fw}",
                        "forward": round(results["jax"][0] / results[fw][0], 3),
                        "train_step": round(results["jax"][1] / results[fw][1], 3),
                    }
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="smoke,default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch_compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.configs.split(","):
        bench(name, args.repeats, args.torch_compile)


if __name__ == "__main__":
    main()
