"""Other forms of the dense blocks that compute the same function, against today's, and what each buys
in compilation and costs in step time (one JSON line per form, then each one's ratios over today's).

  python bench/dense_forms.py [--config default] [--forms concat,padded,remat] \
      [--step_size 128 --step_batch 2]

In DenseRAUnet each dense layer convolves the block input and every earlier layer's output, so each
layer's convolution has an input width of its own (``bench/hlo_profile.py``: 163 distinct convolution
shapes in the default train step); on a GPU every distinct shape is a kernel XLA chooses and autotunes.
The forms:

- ``concat``: today's (``calcjax.model.network.DenseResBlock``);
- ``padded``: one 3x3 shape per block and dilation: each layer's BatchNorm-ReLU output is zero-padded to
  the block's widest input and its kernel zero-padded to match (padded channels meet zero weights, so they
  add exact zeros; the gradients reach the real weights only); more convolution FLOPs;
- ``remat``: each dense block under ``nnx.remat`` (``jax.checkpoint``: its activations recomputed in the
  backward pass instead of kept), less memory, more FLOPs.

For each form, in a fresh process with the compilation cache off: the lowered train step's convolutions
and distinct convolution shapes, its cold compile seconds at the config's training shape, and the median
step seconds at ``--step_size`` / ``--step_batch``; then each form's eval-mode logits on one input against
today's (largest difference) and the ratios form / concat. ``DenseResBlock.__call__`` is replaced in the
bench process only; calcjax's network is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def padded_call(self, x):
    """``DenseResBlock.__call__`` with every 3x3 convolution at the block's widest input (module
    docstring); the same BatchNorm statistics, the same outputs up to float rounding."""
    import jax.numpy as jnp

    from calcjax.model import batchnorm

    widest = self.layers[-1].conv.in_features
    feats, outs = x, []
    for layer in self.layers:
        h = batchnorm.bn_relu(layer.bn, feats)  # the network's own route, as today's form
        extra = widest - h.shape[-1]
        h = jnp.pad(h, ((0, 0), (0, 0), (0, 0), (0, extra)))
        kernel = jnp.pad(layer.conv.kernel.value, ((0, 0), (0, 0), (0, extra), (0, 0)))
        conv = layer.conv
        y = conv.conv_general_dilated(  # the network's own route (calcjax.model.conv), as today's form
            h.astype(conv.dtype), kernel.astype(conv.dtype), (1, 1), conv.padding,
            rhs_dilation=conv.kernel_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        outs.append(y)
        feats = jnp.concatenate([feats, y], axis=-1)
    return self.fuse(jnp.concatenate(outs, axis=-1)) + self.shortcut(x)


def use_form(form: str) -> None:
    """Replaces ``DenseResBlock.__call__`` in this process with ``form``'s (module docstring)."""
    from flax import nnx

    from calcjax.model import network

    original = network.DenseResBlock.__call__
    if form == "padded":
        network.DenseResBlock.__call__ = padded_call
    elif form == "remat":
        network.DenseResBlock.__call__ = nnx.remat(lambda self, x: original(self, x))


def measure(form: str, config: str, step_size: int, step_batch: int) -> dict:
    """The figures of one form, in this process (module docstring)."""
    os.environ["CALCJAX_COMPILE_CACHE"] = "off"
    use_form(form)

    import jax
    import numpy as np

    from bench.compile import _train_step_lowered, train_step_of
    from bench.hlo_profile import profile
    from calcjax.model import network

    lowered = _train_step_lowered(config)
    counts = profile(lowered.as_text())
    t0 = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t0
    step, state, mcfg, _ = train_step_of(config)
    rng = np.random.default_rng(0)
    images = rng.normal(40, 300, (step_batch, step_size, step_size, mcfg.in_channels)).astype(np.float32)
    labels = rng.integers(0, mcfg.num_classes, (step_batch, step_size, step_size)).astype(np.int32)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        state, m = step(state, images, labels)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    model = network.new_model(mcfg, 0)
    model.eval()
    logits = np.asarray(model(images), np.float32)
    np.save(os.path.join(os.environ["DENSE_FORMS_TMP"], f"{form}.npy"), logits)
    return {"bench": "dense_forms", "config": config, "form": form, "convolutions": counts["convolutions"],
            "distinct_convolution_shapes": counts["distinct_convolution_shapes"],
            "compile_s": round(compile_s, 2), "step_s": round(statistics.median(times[1:]), 3),
            "step_input": [step_batch, step_size, step_size], "backend": jax.default_backend()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default")
    p.add_argument("--forms", default="concat,padded,remat", help="concat (today's) first")
    p.add_argument("--step_size", type=int, default=128)
    p.add_argument("--step_batch", type=int, default=2)
    p.add_argument("--form", default="", help=argparse.SUPPRESS)  # one form, in a child process
    args = p.parse_args()
    if args.form:
        print(json.dumps(measure(args.form, args.config, args.step_size, args.step_batch)), flush=True)
        return
    import tempfile

    import numpy as np

    rows, diffs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for form in args.forms.split(","):
            cmd = [sys.executable, __file__, "--form", form, "--config", args.config,
                   "--step_size", str(args.step_size), "--step_batch", str(args.step_batch)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                                 env={**os.environ, "DENSE_FORMS_TMP": tmp}).stdout  # fmt: skip
            rows[form] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(rows[form]), flush=True)
            logits = [np.load(f"{tmp}/{f}.npy") for f in ("concat", form)]
            diffs[form] = float(np.max(np.abs(logits[0] - logits[1])))
    for form, r in rows.items():
        if form != "concat":
            keys = ("convolutions", "distinct_convolution_shapes", "compile_s", "step_s")
            ratios = {k: round(r[k] / rows["concat"][k], 3) for k in keys}
            print(json.dumps({"bench": "dense_forms", "config": args.config, "figure": f"{form}_over_concat",
                              **ratios, "max_abs_logit_difference": diffs[form]}))  # fmt: skip


if __name__ == "__main__":
    main()
