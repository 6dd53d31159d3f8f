"""One 3x3 convolution of the smoke network's shapes in float32 and bfloat16: JAX on XLA's kernels, JAX on
oneDNN's (calcjax.model.conv, the default on a CPU) and PyTorch (oneDNN); one JSON line per framework and
dtype, then the ratios bfloat16 / float32 and JAX's routes over PyTorch.

  python bench/conv_dtypes.py [--batch 8] [--size 96] [--cin 64] [--cout 16] [--repeats 10]

Median milliseconds of the forward convolution, of its weight gradient alone (JAX), and of forward and
backward together (both gradients; PyTorch channels-last, bfloat16 through autocast). Whether bfloat16 pays
on this CPU (AMX and AVX-512 BF16, where present) depends on whether the convolution uses them. PyTorch
runs first: once calcjax's oneDNN convolutions have run in a process, GNU OpenMP throttles PyTorch's
waiting threads (bench/model.py says more).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def timed_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 2)


def jax_conv(x: np.ndarray, w: np.ndarray, dtype: str, repeats: int, route: str) -> dict:
    """Forward, weight-gradient and forward + backward times of ``calcjax.model.conv`` on ``route``
    (``xla`` or ``onednn``)."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from calcjax.model import conv as conv_lib
    from calcjax.model import cpu_kernels

    def conv(a, b):
        return conv_lib.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def total(a, b):
        return jnp.sum(conv(a, b).astype(jnp.float32))

    xs, ws = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    with cpu_kernels.xla_kernels() if route == "xla" else contextlib.nullcontext():
        forward = jax.jit(conv).lower(xs, ws).compile()
        weight_grad = jax.jit(jax.grad(total, argnums=1)).lower(xs, ws).compile()
        both_grads = jax.jit(jax.grad(total, argnums=(0, 1))).lower(xs, ws).compile()
    return {
        "framework": "jax_onednn" if route == "onednn" else "xla",
        "dtype": dtype,
        "forward_ms": timed_ms(lambda: forward(xs, ws).block_until_ready(), repeats),
        "weight_gradient_ms": timed_ms(lambda: weight_grad(xs, ws).block_until_ready(), repeats),
        "forward_backward_ms": timed_ms(lambda: jax.block_until_ready(both_grads(xs, ws)), repeats),
    }


def pytorch(x: np.ndarray, cout: int, dtype: str, repeats: int) -> dict:
    import torch

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(x.shape[-1], cout, 3, padding=1, bias=False).to(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def forward():
        with torch.no_grad(), autocast():
            conv(xt)

    def forward_backward():
        with autocast():
            y = conv(xt)
        y.float().sum().backward()

    return {"framework": "pytorch", "dtype": dtype, "forward_ms": timed_ms(forward, repeats),
            "forward_backward_ms": timed_ms(forward_backward, repeats)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--cin", type=int, default=64)
    p.add_argument("--cout", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    x = np.random.default_rng(0).normal(size=(a.batch, a.size, a.size, a.cin)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(3, 3, a.cin, a.cout)).astype(np.float32)
    shape = {"bench": "conv_dtypes", "input": [a.batch, a.size, a.size, a.cin], "cout": a.cout}
    dtypes = ("float32", "bfloat16")
    rows = []
    for framework in ("pytorch", "xla", "onednn"):  # PyTorch first (module docstring)
        for d in dtypes:
            if framework == "pytorch":
                rows.append(pytorch(x, a.cout, d, a.repeats))
            else:
                rows.append(jax_conv(x, w, d, a.repeats, framework))
            print(json.dumps({**shape, **rows[-1]}), flush=True)

    def row(fw, d):
        return next(r for r in rows if r["framework"] == fw and r["dtype"] == d)

    for fw in ("xla", "jax_onednn", "pytorch"):
        f32, bf16 = row(fw, "float32"), row(fw, "bfloat16")
        ratios = {k: round(bf16[k] / f32[k], 3) for k in f32 if k.endswith("_ms")}
        print(json.dumps({**shape, "framework": fw, "figure": "bfloat16_over_float32", **ratios}), flush=True)
    for fw in ("xla", "jax_onednn"):
        for d in dtypes:
            ours, torch_row = row(fw, d), row("pytorch", d)
            ratios = {k: round(ours[k] / torch_row[k], 3) for k in ("forward_ms", "forward_backward_ms")}
            print(
                json.dumps({**shape, "framework": fw, "dtype": d, "figure": "over_pytorch", **ratios}),
                flush=True,
            )


if __name__ == "__main__":
    main()
