"""oneDNN convolutions on JAX's CPU backend (calcjax.model.conv, calcjax.native): the same function and
gradients as XLA's for every shape the network uses, bitwise repeatable, chosen only where they apply, and a
build that says what it lacks. The fused BatchNorm-ReLU kernels: tests/test_batchnorm.py."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calcjax.model import conv as conv_lib
from calcjax.model import cpu_kernels
from calcjax.model.network import ModelConfig, new_model
from calcjax.native import build, library
from configs import smoke

pytestmark = pytest.mark.skipif(not library.available(), reason=f"{library.unavailable_reason()}")
NHWC = ("NHWC", "HWIO", "NHWC")


def _both(x, w, strides, padding, dilation):
    """The convolution through calcjax's route (oneDNN here) and XLA's, with both gradients of a
    weighted sum of the output."""

    def value_and_grads(fn):
        def loss(x, w):
            y = fn(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC)
            cot = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
            return jnp.sum(y.astype(jnp.float32) * cot), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
        return [y, *grads]

    return value_and_grads(conv_lib.conv_general_dilated), value_and_grads(jax.lax.conv_general_dilated)


def _relative(a, b):
    """Largest difference over the largest magnitude of ``b`` (0 where both are all zero)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


@pytest.mark.parametrize(
    "shape,kernel,strides,padding,dilation",
    [
        ((2, 24, 20, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # 3x3, odd channels
        ((2, 24, 20, 16), (1, 1, 16, 8), (1, 1), ((0, 0), (0, 0)), (1, 1)),  # 1x1 fuse / shortcut
        ((2, 24, 20, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # strided transition
        ((1, 16, 16, 12), (3, 3, 12, 4), (1, 1), ((3, 3), (3, 3)), (3, 3)),  # atrous bottleneck
        ((1, 15, 17, 4), (3, 3, 4, 6), (2, 1), ((0, 2), (1, 0)), (1, 2)),  # asymmetric everything
        ((1, 16, 16, 4), (3, 3, 4, 6), (1, 1), "SAME", (2, 2)),  # padding given as a string
    ],
)
def test_matches_xla_forward_and_gradients_float32(shape, kernel, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=kernel) / np.sqrt(np.prod(kernel[:3])), jnp.float32)
    ours, xla = _both(x, w, strides, padding, dilation)
    assert ours[0].shape == xla[0].shape
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), ours, xla, strict=True):
        assert _relative(a, b) < 2e-6, name


def test_matches_xla_in_bfloat16():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 32, 16)) / 17, jnp.bfloat16)
    ours, xla = _both(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1))
    assert ours[0].dtype == jnp.bfloat16 and ours[2].dtype == jnp.bfloat16
    for a, b in zip(ours, xla, strict=True):
        assert _relative(a, b) < 1e-2  # bfloat16 has 8 bits of mantissa; both accumulate in float32


def test_the_route_is_taken_and_is_bitwise_repeatable():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 8)), jnp.float32)
    w = jnp.ones((3, 3, 8, 4), jnp.float32) / 9

    def f(x, w):
        return conv_lib.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)

    assert library.CONV_FORWARD in jax.jit(f).lower(x, w).as_text()
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
    first, second = grads(x, w), grads(x, w)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    with cpu_kernels.xla_kernels():  # a function traced inside the block (jit keeps earlier traces)
        assert library.CONV_FORWARD not in jax.jit(lambda x, w: f(x, w)).lower(x, w).as_text()


def test_the_network_agrees_with_itself_on_xla_kernels():
    cfg = ModelConfig.from_config(smoke.get_config().model)
    model = new_model(cfg, 0)
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(3).normal(40, 300, size=(2, 32, 32, cfg.in_channels)), jnp.float32)

    def loss(state, x):
        m = nnx.merge(graphdef, state)
        logits = m(x)
        return jnp.mean(logits**2), logits

    def run():
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state, x)

    (l1, logits1), g1 = run()
    with cpu_kernels.xla_kernels():
        (l2, logits2), g2 = run()
    assert _relative(logits1, logits2) < 1e-4  # the twin-parity tolerance
    assert abs(float(l1 - l2)) <= 1e-4 * abs(float(l2))
    worst = max(_relative(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True))
    assert worst < 1e-3


def test_what_the_route_does_not_cover_goes_to_xla(monkeypatch):
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    w = jnp.ones((3, 3, 2, 4), jnp.float32)
    grouped = jax.jit(
        lambda x, w: conv_lib.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2
        )
    )
    assert library.CONV_FORWARD not in grouped.lower(x, w).as_text()
    cropping = jax.jit(
        lambda x, w: conv_lib.conv_general_dilated(
            x, jnp.ones((3, 3, 4, 4)), (1, 1), ((-1, 0), (0, 0)), dimension_numbers=NHWC
        )
    )
    assert library.CONV_FORWARD not in cropping.lower(x, w).as_text()  # negative padding: XLA's
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)  # several devices: XLA partitions its own convs
    assert not cpu_kernels.uses_native()


def test_the_build_names_what_it_lacks(tmp_path, monkeypatch):
    built = build.LIBRARY.stat().st_mtime_ns
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(build.BuildError, match="no-such-compiler"):
        build.build(tmp_path / "lib.so")
    with pytest.raises(build.BuildError, match="onednn-devel-cpu-gomp"):
        build.dnnl_dirs(str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing half-written
    result = subprocess.run(
        [sys.executable, "-m", "calcjax.native.build", "--if_possible", "--force"],
        capture_output=True, text=True, env={"CXX": "no-such-compiler", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0 and "XLA's CPU kernels" in result.stdout
    assert build.LIBRARY.stat().st_mtime_ns == built  # the library make install built is untouched
