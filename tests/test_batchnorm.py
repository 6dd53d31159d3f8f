"""The fused BatchNorm-ReLU on JAX's CPU backend (calcjax.model.batchnorm, native/batchnorm_kernels.cc):
flax's function, running statistics and gradients, at least as close to float64 as XLA's float32, bitwise
repeatable on any thread count, taken only in training mode where it applies; the kernel choice checked."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calcjax.model import batchnorm, cpu_kernels
from calcjax.model.network import ModelConfig, new_model
from calcjax.native import library
from configs import smoke

pytestmark = pytest.mark.skipif(not library.available(), reason=f"{library.unavailable_reason()}")
ROOT = Path(__file__).resolve().parents[1]


def _relative(a, b):
    """Largest difference over the largest magnitude of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _inputs(shape, seed, mean=0.3, std=2.0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(mean, std, shape).astype(np.float32)
    scale = rng.normal(1.0, 0.3, c).astype(np.float32)
    bias = rng.normal(0.0, 0.3, c).astype(np.float32)
    weights = rng.normal(size=shape).astype(np.float32)  # the loss's weights on the output
    return x, scale, bias, weights


def _loss(fused, weights):
    """A loss of the output and of both statistics (so every cotangent of the kernel is exercised)."""

    def loss(x, scale, bias):
        if fused:
            y, mean, var = batchnorm.batchnorm_relu((x,), scale, bias, 1e-5)
        else:
            axes = tuple(range(x.ndim - 1))
            mean = x.mean(axes)
            var = ((x - mean) ** 2).mean(axes)
            y = jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias)
        return jnp.sum(y * weights) + jnp.sum(3.0 * mean) + jnp.sum(0.5 * var), (y, mean, var)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _float64_reference(x, scale, bias, weights):
    """Outputs and gradients of the same loss in float64 (numpy, by hand)."""
    x, scale, bias, weights = (np.asarray(a, np.float64) for a in (x, scale, bias, weights))
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    mean, var = x.mean(axes), x.var(axes)
    inv = 1.0 / np.sqrt(var + 1e-5)
    xhat = (x - mean) * inv
    pre = xhat * scale + bias
    g = np.where(pre > 0, weights, 0.0)
    dbias, dscale = g.sum(axes), (g * xhat).sum(axes)
    dx = scale * inv * (g - dbias / n - xhat * dscale / n) + 3.0 / n + 0.5 * 2.0 * (x - mean) / n
    return (np.maximum(pre, 0.0), mean, var), (dx, dscale, dbias)


@pytest.mark.parametrize(
    "shape,mean",
    [
        ((4, 64, 64, 16), 0.3),  # the smoke network's widest layer at its bench size, 64 chunks
        ((2, 16, 16, 96), 0.3),  # many channels, few pixels (2 chunks)
        ((1, 3, 5, 7), 0.3),  # odd channels, fewer pixels than one run
        ((3, 33, 13), 0.3),  # 3D input; pixels not a multiple of the run
        ((2, 32, 32, 8), 1000.0),  # a large mean over a unit spread: the shifted sums keep the variance
    ],
)
def test_values_statistics_and_gradients_match_float64(shape, mean):
    x, scale, bias, weights = _inputs(shape, seed=len(shape) + shape[-1], mean=mean)
    (_, ours), ours_grads = _loss(True, weights)(x, scale, bias)
    (_, xla), xla_grads = _loss(False, weights)(x, scale, bias)
    exact, exact_grads = _float64_reference(x, scale, bias, weights)
    names = ("output", "mean", "variance", "input gradient", "scale gradient", "bias gradient")
    rows = zip(names, (*ours, *ours_grads), (*xla, *xla_grads), (*exact, *exact_grads), strict=True)
    for name, a, b, ref in rows:
        # At float32 rounding of the largest value, and no farther from float64 than XLA's float32 (with
        # room for one rounding of the output, where XLA happens to land nearer).
        assert _relative(a, ref) < 1e-6 or _relative(a, ref) <= 1.5 * _relative(b, ref), name
        assert _relative(a, ref) < 2e-5, name


def test_running_statistics_follow_flax():
    x, *_ = _inputs((2, 16, 16, 12), seed=5)
    ours, theirs = (nnx.BatchNorm(12, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0)) for _ in range(2))
    ours.train(), theirs.train()
    y_ours = batchnorm.bn_relu(ours, jnp.asarray(x))
    with cpu_kernels.xla_kernels():
        y_theirs = batchnorm.bn_relu(theirs, jnp.asarray(x))
    assert _relative(y_ours, y_theirs) < 2e-6
    np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-6)
    assert float(jnp.abs(ours.mean[...]).max()) > 0  # they moved


def _network_hlo(train: bool, dtype: str = "float32", kernels: str = "native") -> str:
    """The StableHLO of the smoke network's forward pass (batch 1, 32x32)."""
    cfg = ModelConfig.from_config(smoke.get_config().model)
    model = new_model(dataclasses.replace(cfg, dtype=dtype), 0)
    model.train() if train else model.eval()
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 32, 32, cfg.in_channels), jnp.float32)
    with cpu_kernels.xla_kernels() if kernels == "xla" else contextlib.nullcontext():
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()


def test_the_kernels_are_taken_in_training_only_where_they_apply(monkeypatch):
    assert library.BN_RELU_FORWARD in _network_hlo(train=True)
    assert library.BN_RELU_FORWARD not in _network_hlo(train=False)  # running statistics: flax's
    assert library.BN_RELU_FORWARD not in _network_hlo(train=True, dtype="bfloat16")
    assert library.BN_RELU_FORWARD not in _network_hlo(train=True, kernels="xla")
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)  # several devices: XLA partitions its own
    assert library.BN_RELU_FORWARD not in _network_hlo(train=True)


_REPEAT_SCRIPT = """
import sys
import numpy as np
import jax.numpy as jnp
from calcjax.model import batchnorm
rng = np.random.default_rng(9)
x = jnp.asarray(rng.normal(size=(4, 48, 48, 24)), jnp.float32)
s = jnp.asarray(rng.normal(1, 0.2, 24), jnp.float32)
loss = lambda x, s: (batchnorm.batchnorm_relu((x,), s, s, 1e-5)[0] ** 2).sum()
import jax
g = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, s)
y, m, v = batchnorm.batchnorm_relu((x,), s, s, 1e-5)
np.savez(sys.argv[1], y=y, m=m, v=v, gx=g[0], gs=g[1])
"""


def test_bitwise_repeatable_on_any_thread_count(tmp_path):
    outputs = []
    for threads in ("1", "2", "2"):
        out = tmp_path / f"run{len(outputs)}.npz"
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
        result = subprocess.run(
            [sys.executable, "-c", _REPEAT_SCRIPT, str(out)], env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(np.load(out))
    for other in outputs[1:]:
        for key in ("y", "m", "v", "gx", "gs"):
            np.testing.assert_array_equal(outputs[0][key], other[key], err_msg=key)


def test_pieces_give_the_concatenation_s_results_bitwise():
    x, scale, bias, weights = _inputs((2, 24, 24, 20), seed=11)
    cuts = (0, 8, 16, 20)  # a dense layer's input: the block's input and two earlier outputs
    pieces = tuple(jnp.asarray(x[..., a:b]) for a, b in zip(cuts, cuts[1:], strict=False))

    def loss(pieces, scale, bias):
        y, mean, var = batchnorm.batchnorm_relu(pieces, scale, bias, 1e-5)
        return jnp.sum(y * weights) + jnp.sum(mean) + jnp.sum(var), (y, mean, var)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, whole), (dx, dscale, dbias) = grad((jnp.asarray(x),), scale, bias)
    (_, parts), (dparts, dscale_p, dbias_p) = grad(pieces, scale, bias)
    for a, b in zip((*whole, dscale, dbias), (*parts, dscale_p, dbias_p), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dx[0], jnp.concatenate(dparts, axis=-1))


def test_the_network_s_dense_layers_build_no_concatenation():
    assert "concatenate" in _network_hlo(train=True, kernels="xla")
    # On the native route only the decoder's inputs (upsampled features and the skip) are concatenated.
    depth = len(smoke.get_config().model.widths)
    assert _network_hlo(train=True).count("stablehlo.concatenate") == depth


def test_misfit_operands_are_refused_naming_the_rule():
    x = jnp.ones((2, 4, 4, 8), jnp.float32)
    with pytest.raises(Exception, match="per-channel operands must have the pieces' channels together"):
        jax.block_until_ready(batchnorm.batchnorm_relu((x,), jnp.ones(7), jnp.ones(7), 1e-5))
    with pytest.raises(Exception, match="input pieces must share every axis but the last"):
        pieces = (x, jnp.ones((2, 4, 5, 8), jnp.float32))
        jax.block_until_ready(batchnorm.batchnorm_relu(pieces, jnp.ones(16), jnp.ones(16), 1e-5))


def test_the_choice_is_checked(monkeypatch):
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, "mkl")
    with pytest.raises(ValueError, match="CALCJAX_CPU_KERNELS='mkl'"):
        cpu_kernels.choice()
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, "XLA")
    assert not cpu_kernels.uses_native()
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, "native")
    assert cpu_kernels.uses_native()


def test_the_benchmark_measures_both_kernels():
    sys.path.insert(0, str(ROOT))
    from bench import batchnorm as bench

    rows = [bench.measure((2, 16, 16, 8), kernels, repeats=2) for kernels in ("xla", "native")]
    assert [r["kernels"] for r in rows] == ["xla", "native"]
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in rows)
