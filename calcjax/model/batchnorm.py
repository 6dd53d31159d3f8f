"""The network's BatchNorm-ReLU: a native kernel per pass on JAX's CPU backend in training, flax's elsewhere.

:func:`bn_relu` is ``jax.nn.relu(bn(x))`` for a flax ``nnx.BatchNorm`` ``bn``, running statistics updated as
flax updates them. In training mode (``use_running_average`` False), float32, channels last, one CPU device
and the native library built (:func:`calcjax.model.cpu_kernels.uses_native`), the batch statistics, the
normalisation and the ReLU run as one native kernel (``calcjax/native/batchnorm_kernels.cc``) and their
gradient as another (a ``jax.custom_vjp``), in place of the dozen XLA fusions and reductions flax's BatchNorm
and the ReLU become. A dense block's layers give their input as pieces (the block's input and each earlier
layer's output), which the kernels read in place: the concatenation XLA would build for each layer is never
built, and the gradient comes back as one piece each. The kernels sum in double, as PyTorch's CPU BatchNorm
does: their mean, variance and gradients lie as close to the float64 result as XLA's two-pass float32 ones or
closer (``tests/test_batchnorm.py``). Inference (running statistics), bfloat16, several devices and every
accelerator keep flax's BatchNorm; ``$CALCJAX_CPU_KERNELS=xla`` chooses it on a CPU too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calcjax.model import cpu_kernels
from calcjax.native import library


def bn_relu(bn: nnx.BatchNorm, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """``relu(bn(x))``, ``x`` (..., C) channels last, or a sequence of pieces read as their concatenation
    along the channels (a dense block's input: on the native route it is never built); in training mode
    ``bn.mean`` / ``bn.var`` move towards the batch's statistics by ``1 - bn.momentum`` (flax's rule),
    through the native kernels where :func:`native_covers` (module docstring)."""
    pieces = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    if bn.use_running_average is not False or not native_covers(bn, pieces):
        return jax.nn.relu(bn(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)))
    y, mean, var = batchnorm_relu(pieces, bn.scale[...], bn.bias[...], float(bn.epsilon))
    keep = bn.momentum
    bn.mean[...] = jax.lax.stop_gradient(keep * bn.mean[...] + (1 - keep) * mean)
    bn.var[...] = jax.lax.stop_gradient(keep * bn.var[...] + (1 - keep) * var)
    return y


def native_covers(bn: nnx.BatchNorm, pieces: Sequence[jax.Array]) -> bool:
    """Whether the native kernels compute this BatchNorm: float32 pieces, parameters and compute dtype,
    channels last, a learned scale and bias, no cross-device axis, and :func:`cpu_kernels.uses_native`."""
    float32 = jnp.dtype(jnp.float32)
    if any(p.dtype != float32 or p.ndim < 2 for p in pieces) or jnp.dtype(bn.dtype or float32) != float32:
        return False
    if bn.scale is None or bn.bias is None or bn.scale.dtype != float32 or bn.bias.dtype != float32:
        return False
    if bn.axis not in (-1, pieces[0].ndim - 1) or bn.axis_name is not None:
        return False
    return cpu_kernels.uses_native()


def _call(target: str, outputs, *operands, epsilon: float):
    return cpu_kernels.ffi_call(
        "native BatchNorm-ReLU", target, outputs, *operands, epsilon=np.float32(epsilon)
    )


def _like(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batchnorm_relu(pieces: tuple[jax.Array, ...], scale: jax.Array, bias: jax.Array, epsilon: float):
    """``(y, mean, var)``: the concatenation of ``pieces`` (each (..., c_i), float32, one shape but the
    last axis) along the channels, normalised with its batch statistics over every axis but the last, scaled,
    shifted and passed through a ReLU, shape (..., C); ``mean`` and the biased ``var`` (C,)."""
    channels = scale.shape[0]
    outputs = (_like((*pieces[0].shape[:-1], channels)), _like((channels,)), _like((channels,)))
    return tuple(_call(library.BN_RELU_FORWARD, outputs, scale, bias, *pieces, epsilon=epsilon))


def _forward(pieces, scale, bias, epsilon):
    y, mean, var = batchnorm_relu(pieces, scale, bias, epsilon)
    return (y, mean, var), (pieces, scale, bias, mean, var)


def _backward(epsilon, residuals, cotangents):
    pieces, scale, bias, mean, var = residuals
    dy, dmean, dvar = cotangents
    outputs = (_like(scale.shape), _like(bias.shape), *(_like(p.shape) for p in pieces))
    operands = (dy, scale, bias, mean, var, dmean, dvar, *pieces)
    dscale, dbias, *dx = _call(library.BN_RELU_BACKWARD, outputs, *operands, epsilon=epsilon)
    return tuple(dx), dscale, dbias


batchnorm_relu.defvjp(_forward, _backward)
