"""DenseRAUnet speed on this CPU, JAX (jitted) next to its PyTorch twin (one JSON line per figure).

  python bench/model.py [--configs smoke,default] [--repeats 10] [--rounds 1] [--torch_compile]

For configs/smoke.py at 128x128 and configs/default.py at 512x512, batch 4, float32: median seconds of the
forward pass (eval mode) and of a train step (forward + backward + AdamW update), for JAX (``jax.jit``, state
donated) on calcjax's native CPU kernels (oneDNN's convolutions, the fused BatchNorm-ReLU:
``calcjax.model.cpu_kernels``, the default) and on XLA's (``CALCJAX_CPU_KERNELS=xla``), and PyTorch (eager,
and ``torch.compile`` with ``--torch_compile``); the ratios JAX / PyTorch (< 1: JAX faster; with ``--rounds
N``, every framework is measured N times, interleaved, each time in a fresh process: the median seconds, and
the median of each round's ratio), and the achieved GFLOP/s from XLA's FLOP count of the forward pass (a train
step counted as 3x the forward). Each framework (and each JAX route) is measured in a process of its own: GNU
OpenMP throttles its waiting threads once more threads than cores have joined OpenMP teams, so PyTorch's CPU
ops slow by about a fifth in a process where calcjax's oneDNN convolutions have run. Every process runs with
the same ``GLIBC_TUNABLES`` (``--glibc_tunables``; by default huge pages for malloc's mapped memory, as
``calcjax-train`` runs: ``calcjax.core.huge_pages``; ``""`` the machine's default), named in each line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from calcjax.core.huge_pages import TUNABLE  # noqa: E402  (no jax: the parent process stays light)
from calcjax.native.library import CPU_KERNELS_ENV  # noqa: E402

SIZES = {"smoke": 128, "default": 512}
BATCH = 4
JAX_ROUTES = {"jax": "native", "jax_xla_kernels": "xla"}


def timed(fn, repeats):
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def setup(name):
    """The model config, the loss config and a random batch of one setup: HU-like input ``(B, H, W, 3)``
    float32 and labels ``(B, H, W)``."""
    from calcjax.model import network as jmodel
    from calcjax.train import step as ts
    from configs import default, smoke

    cfg = {"smoke": smoke, "default": default}[name].get_config()
    cfg.model.dtype = "float32"
    size = SIZES[name]
    mcfg = jmodel.ModelConfig.from_config(cfg.model)
    rng = np.random.default_rng(0)
    x = rng.normal(40, 300, size=(BATCH, size, size, mcfg.in_channels)).astype(np.float32)
    y = rng.integers(0, mcfg.num_classes, size=(BATCH, size, size))
    return mcfg, ts.LossConfig.from_config(cfg.loss), x, y


def jax_times(name, repeats):
    """``{"times": (forward_s, train_s), "flops": forward FLOPs of the batch, "params": n}`` of the JAX
    model on the kernels ``$CALCJAX_CPU_KERNELS`` names."""
    import jax
    import jax.numpy as jnp

    from calcjax.model import network as jmodel
    from calcjax.train import step as ts

    mcfg, loss_cfg, x, y = setup(name)
    net = jmodel.new_model(mcfg, 0)
    flops = jmodel.flops_per_slice(net, x.shape[1], x.shape[2]) * BATCH
    tx = ts.make_optimizer(
        learning_rate=1e-3, warmup_steps=10, total_steps=1000, weight_decay=1e-4, grad_clip=1.0
    )
    graphdef, state = ts.create_state(net, tx)
    eval_fn = jax.jit(lambda p, s, im: ts.eval_logits(graphdef, p, s, im))
    step = ts.make_train_step(graphdef, tx, loss_cfg)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    holder = {"state": state}

    def forward():
        eval_fn(holder["state"].params, holder["state"].batch_stats, xj).block_until_ready()

    def train():
        holder["state"], m = step(holder["state"], xj, yj)
        m["loss"].block_until_ready()

    times = (timed(forward, repeats), timed(train, repeats))
    return {"times": times, "flops": flops, "params": jmodel.parameter_count(net)}


def torch_times(name, repeats, label):
    """``{"times": (forward_s, train_s)}`` of the PyTorch twin, eager (``label`` "eager") or
    ``torch.compile``d."""
    import torch

    from calcjax.model import network as jmodel
    from calcjax.research.torch_baseline import convert
    from calcjax.research.torch_baseline import losses as tlosses
    from calcjax.research.torch_baseline import model as tmodel

    mcfg, loss_cfg, x, y = setup(name)
    tnet = tmodel.DenseRAUnet(mcfg)
    tnet.load_state_dict(convert.jax_to_torch(jmodel.new_model(mcfg, 0)))
    module = torch.compile(tnet) if label == "compile" else tnet
    xt, yt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)
    opt = torch.optim.AdamW(tnet.parameters(), lr=1e-3, weight_decay=1e-4)

    def forward():
        module.eval()
        with torch.no_grad():
            module(xt)

    def train():
        module.train()
        opt.zero_grad(set_to_none=True)
        loss = tlosses.bootstrap_iou_loss(
            module(xt), yt, rho=loss_cfg.rho, k_min=loss_cfg.k_min, lam=loss_cfg.lam
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()

    return {"times": (timed(forward, repeats), timed(train, repeats))}


def measure(name, framework, repeats, glibc_tunables) -> dict:
    """One framework's figures, measured in a fresh process with ``GLIBC_TUNABLES`` = ``glibc_tunables``
    (module docstring); ``{"error": ...}`` when it fails (``torch.compile`` may not work on every
    machine)."""
    env = dict(os.environ, GLIBC_TUNABLES=glibc_tunables)
    if framework in JAX_ROUTES:
        env[CPU_KERNELS_ENV] = JAX_ROUTES[framework]
    cmd = [sys.executable, __file__, "--configs", name, "--repeats", str(repeats), "--_one", framework]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1][:200] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def one(name, framework, repeats) -> dict:
    if framework in JAX_ROUTES:
        return jax_times(name, repeats)
    return torch_times(name, repeats, framework.removeprefix("torch_"))


def interleaved(name, repeats, frameworks, glibc_tunables, rounds) -> dict:
    """``{framework: [result of each round]}``: ``rounds`` rounds, each measuring every framework once in
    its own process (so that the machine's slow drifts fall on all of them alike)."""
    results = {fw: [] for fw in frameworks}
    for _ in range(rounds):
        for fw in frameworks:
            results[fw].append(measure(name, fw, repeats, glibc_tunables))
    return results


def bench(name, repeats, torch_compile, glibc_tunables, rounds=1):
    """Prints the lines of config ``name`` (module docstring): each framework's median seconds over the
    rounds, and each ratio the median of the rounds' own ratios."""
    frameworks = [*JAX_ROUTES, "torch_eager"] + (["torch_compile"] if torch_compile else [])
    per_round = interleaved(name, repeats, frameworks, glibc_tunables, rounds)
    failed = {fw: next((r for r in rs if "error" in r), None) for fw, rs in per_round.items()}
    if failed["jax"]:
        raise SystemExit(f"bench/model.py: JAX failed: {failed['jax']['error']}")
    flops = per_round["jax"][0]["flops"]
    size = SIZES[name]
    common = {"bench": "model", "config": name, "input": [BATCH, size, size, 3], "dtype": "float32",
              "glibc_tunables": glibc_tunables, "rounds": rounds}  # fmt: skip
    common |= {"params": per_round["jax"][0]["params"], "gflop_forward": round(flops / 1e9, 2)}
    rounds_of = {fw: [r["times"] for r in rs] for fw, rs in per_round.items() if not failed[fw]}
    for fw in per_round:
        if failed[fw]:
            print(json.dumps({**common, "framework": fw, "error": failed[fw]["error"]}))
            continue
        fwd, train = (statistics.median(t[i] for t in rounds_of[fw]) for i in (0, 1))
        line = {
            **common,
            "framework": fw,
            "seconds_forward": round(fwd, 4),
            "seconds_train_step": round(train, 4),
        }
        line["gflops_per_s_forward"] = round(flops / fwd / 1e9, 1)
        line["gflops_per_s_train"] = round(3 * flops / train / 1e9, 1)
        print(json.dumps(line))
    for jax_fw in (f for f in JAX_ROUTES if f in rounds_of):
        for fw in (f for f in rounds_of if f.startswith("torch")):
            pairs = list(zip(rounds_of[jax_fw], rounds_of[fw], strict=True))
            ratio = [round(statistics.median(a[i] / b[i] for a, b in pairs), 3) for i in (0, 1)]
            print(
                json.dumps(
                    {**common, "figure": f"{jax_fw}_over_{fw}", "forward": ratio[0], "train_step": ratio[1]}
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="smoke,default")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of one process per framework, interleaved"
    )
    parser.add_argument("--torch_compile", action="store_true")
    parser.add_argument(
        "--glibc_tunables", default=TUNABLE, help="GLIBC_TUNABLES of every measured process ('': none)"
    )
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        res = one(args.configs, args._one, args.repeats)
        print(json.dumps({**res, "times": list(res["times"])}))
        return
    for name in args.configs.split(","):
        bench(name, args.repeats, args.torch_compile, args.glibc_tunables, args.rounds)


if __name__ == "__main__":
    main()
