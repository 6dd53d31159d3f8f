"""The training BatchNorm-ReLU at the smoke network's shapes: JAX on XLA's kernels (flax's BatchNorm and a
ReLU) against calcjax's native kernel (calcjax.model.batchnorm, the default on a CPU); one JSON line per shape
and kernel, then the ratio native / XLA.

  python bench/batchnorm.py [--batch 4] [--size 128] [--repeats 30]

Median milliseconds of the forward pass in training mode (batch statistics, running statistics updated) and
of forward and backward together (the gradient of a weighted sum of the output with respect to the input,
the scale and the bias), float32, one CPU device. Shapes: the smoke network's BatchNorm inputs at the bench
size (``bench/model.py``): full resolution with 16 and 32 channels, half with 64, an eighth with 160.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.conv_dtypes import timed_ms  # noqa: E402

SHAPES = ((1, 16), (1, 32), (2, 64), (8, 160))  # (downsampling factor, channels)


def measure(shape: tuple[int, ...], kernels: str, repeats: int) -> dict:
    """Forward and forward + backward milliseconds of one BatchNorm-ReLU on ``kernels`` (native or xla)."""
    import contextlib

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from calcjax.model import batchnorm, cpu_kernels

    x = jnp.asarray(np.random.default_rng(0).normal(0.2, 1.5, shape), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    bn = nnx.BatchNorm(shape[-1], momentum=0.9, epsilon=1e-5, use_running_average=False, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def forward(params, stats, x):
        module = nnx.merge(graphdef, params, stats, copy=True)
        return batchnorm.bn_relu(module, x), nnx.state(module, nnx.BatchStat)

    def loss(params, stats, x):
        return jnp.sum(forward(params, stats, x)[0] * weights)

    with cpu_kernels.xla_kernels() if kernels == "xla" else contextlib.nullcontext():
        fwd = jax.jit(forward).lower(params, stats, x).compile()
        both = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, stats, x).compile()
    return {
        "kernels": kernels,
        "forward_ms": timed_ms(lambda: jax.block_until_ready(fwd(params, stats, x)), repeats),
        "forward_backward_ms": timed_ms(lambda: jax.block_until_ready(both(params, stats, x)), repeats),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    for factor, channels in SHAPES:
        side = a.size // factor
        shape = (a.batch, side, side, channels)
        common = {"bench": "batchnorm_relu", "input": list(shape)}
        rows = {k: measure(shape, k, a.repeats) for k in ("xla", "native")}
        for row in rows.values():
            print(json.dumps({**common, **row}), flush=True)
        ratios = {
            k: round(rows["native"][k] / rows["xla"][k], 3) for k in ("forward_ms", "forward_backward_ms")
        }
        print(json.dumps({**common, "figure": "native_over_xla", **ratios}), flush=True)


if __name__ == "__main__":
    main()
