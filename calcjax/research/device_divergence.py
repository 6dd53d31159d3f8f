r"""Where JAX training on one device and on two first part: the first train step of a run, computed on a
1-device and on a 2-device ``('data',)`` mesh from the same weights and the same batch, quantity by quantity.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m calcjax.research.device_divergence \
      --config=configs/shipped.py --config.data.shards=SHARDS [--config.KEY=VALUE ...] --out=FILE.json

Compared: the eval-mode logits (BatchNorm with its running statistics: every operation works on one
sample at a time), then, in the order the train step computes them, the BatchNorm statistics of the
train-mode forward pass (each layer's batch mean and variance over batch, height and width), the logits,
the loss, and the gradient of every parameter; for each, whether the two are bitwise equal, how many arrays
differ and the largest absolute and relative difference. Two more figures name the operation: how many
cross-device all-reduces the compiled 2-device step holds (XLA sums each per-device partial result across
devices), and a check of the mechanism on a seeded float32 tensor shaped like the first layer's
activations: its per-channel mean over (batch, height, width) on 2 devices equals bitwise the two
half-batch sums added afterwards, and differs from the 1-device mean, which adds the same terms in another
order. Writes ``FILE.json`` (``calcjax.research.repro`` reports it).
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from calcjax.core import cli, compile_cache, sharding
from calcjax.io.atomic import write_atomic
from calcjax.model import network as model_lib
from calcjax.train import loop
from calcjax.train import step as ts

QUANTITIES = ("eval_logits", "batch_stats", "logits", "loss", "gradients")


def tree_difference(a, b) -> dict:
    """Two pytrees of the same structure: bitwise equal?, arrays compared and differing, the largest
    absolute difference and the largest relative one (to the array's largest magnitude), and its array."""
    leaves = jax.tree_util.tree_flatten_with_path(a)[0]
    rows = []
    for (path, x), y in zip(leaves, jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        rows.append((jax.tree_util.keystr(path) or "(array)", d, d / max(float(np.max(np.abs(x))), 1e-30)))
    worst = max(rows, key=lambda r: r[2])
    differing = sum(r[1] > 0 for r in rows)
    return {"bitwise_equal": differing == 0, "arrays": len(rows), "arrays_differing": differing,
            "max_abs_difference": max(r[1] for r in rows), "max_relative_difference": worst[2],
            "largest_relative_in": worst[0] if differing else None}  # fmt: skip


def mean_as_half_sums(shape: tuple[int, ...], seed: int = 0) -> dict:
    """The per-channel mean over (B, H, W) of a float32 tensor ``shape`` ``(B, H, W, C)`` (seeded normal
    values on the HU scale): on 1 device, on 2 devices, and on 1 device as the two half-batch sums added
    afterwards (what an all-reduce of per-device partial sums does)."""
    x = np.random.default_rng(seed).normal(0.0, 300.0, shape).astype(np.float32)
    mean = jax.jit(lambda a: jnp.mean(a, axis=(0, 1, 2)))
    on = {}
    for n in (1, 2):
        mesh = sharding.make_mesh(jax.devices()[:n])
        on[n] = np.asarray(mean(jax.device_put(x, sharding.data_sharding(mesh))))
    half, count = shape[0] // 2, shape[0] * shape[1] * shape[2]
    halves = np.asarray(
        jax.jit(lambda a: (jnp.sum(a[:half], axis=(0, 1, 2)) + jnp.sum(a[half:], axis=(0, 1, 2))) / count)(x)
    )
    return {"two_devices_equal_one": bool(np.array_equal(on[2], on[1])),
            "two_devices_equal_half_sums": bool(np.array_equal(on[2], halves)),
            "max_abs_difference_one_vs_two": float(np.max(np.abs(on[1] - on[2])))}  # fmt: skip


def first_step(config, mesh, batch: dict) -> tuple[dict, int]:
    """The first train step's quantities on ``mesh`` (:data:`QUANTITIES`: the eval-mode logits, then the
    train step's BatchNorm statistics, logits, loss and gradients) and the number of all-reduce operations
    in its compiled program."""
    graphdef, state, _, _ = loop.model_and_step(config, mesh)
    loss_cfg = ts.LossConfig.from_config(config.loss)

    def quantities(st, images, labels):
        loss, stats, logits, grads = ts.loss_and_grads(graphdef, loss_cfg, st.params, st.batch_stats,
                                                       images, labels)  # fmt: skip
        eval_logits = ts.eval_logits(graphdef, st.params, st.batch_stats, images)
        return {"eval_logits": eval_logits, "batch_stats": stats, "logits": logits, "loss": loss,
                "gradients": grads}  # fmt: skip

    rep, dat = sharding.replicated(mesh), sharding.data_sharding(mesh)
    fn = jax.jit(quantities, in_shardings=(rep, dat, dat), compiler_options=compile_cache.compiler_options())
    g = sharding.to_global(batch, mesh)
    compiled = fn.lower(state, g["images"], g["labels"]).compile()
    all_reduces = len(re.findall(r"\ball-reduce(?:-start)?\(", compiled.as_text()))
    return jax.device_get(compiled(state, g["images"], g["labels"])), all_reduces


def divergence(config) -> dict:
    """Every figure of the module docstring for ``config``'s first training batch."""
    if jax.device_count() < 2:
        raise RuntimeError(
            f"{jax.device_count()} device(s): the comparison needs 2 "
            "(XLA_FLAGS=--xla_force_host_platform_device_count=2 on a CPU)"
        )
    mcfg = model_lib.ModelConfig.from_config(config.model)
    batch = next(iter(loop.train_stream(config, config.train.batch_size, mcfg.pixel_mm, None)))
    batch = {"images": np.asarray(batch["images"]), "labels": np.asarray(batch["labels"])}
    one, _ = first_step(config, sharding.make_mesh(jax.devices()[:1]), batch)
    two, all_reduces = first_step(config, sharding.make_mesh(jax.devices()[:2]), batch)
    compared = {k: tree_difference(one[k], two[k]) for k in QUANTITIES}
    first_activations = (*batch["images"].shape[:3], mcfg.widths[0])
    return {"batch_size": int(batch["images"].shape[0]), "all_reduces_in_2_device_step": all_reduces,
            **compared, "mean_of_a_tensor": mean_as_half_sums(first_activations)}  # fmt: skip


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("out", None, "Write the figures here (JSON).")


def main(argv) -> None:
    del argv
    compile_cache.enable()
    result = divergence(flags.FLAGS.config)
    write_atomic(flags.FLAGS.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    cli.run_command("calcjax-device-divergence", "calcjax.research.device_divergence", __doc__, main,
                    define_flags, required=["config", "out"])  # fmt: skip
