"""The network's convolution: oneDNN's kernels on JAX's CPU backend, XLA's everywhere else.

:func:`conv_general_dilated` has ``jax.lax.conv_general_dilated``'s signature (``nnx.Conv`` takes it as its
``conv_general_dilated``). Where :func:`calcjax.model.cpu_kernels.uses_native` (the CPU backend, one device,
the native library built: :mod:`calcjax.native`), a 2D NHWC / HWIO convolution (any stride, dilation and
explicit padding; no input dilation or feature groups) runs as oneDNN's forward kernel, and its gradient as
oneDNN's backward data and backward weights kernels (a ``jax.custom_vjp``); anything else, and every
accelerator, goes to ``jax.lax.conv_general_dilated``. On this project's 2-core CPU oneDNN's convolutions are
2.7-4x XLA's in float32 and 16-18x in bfloat16 (``bench/conv_dtypes.py``, one 3x3 convolution). Outputs match
XLA's to float rounding (summation order), not bitwise: ``$CALCJAX_CPU_KERNELS=xla`` gives XLA's numbers on a
CPU. oneDNN runs on GNU OpenMP threads beside XLA's own; in a process that also runs PyTorch on the CPU,
PyTorch's ops slow by about a fifth once these have run (OpenMP throttles its waiting threads when more
threads than cores have joined its teams), so the benchmarks measure each framework in a process of its own.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax

from calcjax.model import cpu_kernels
from calcjax.native import library

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    **kwargs,
):
    """``jax.lax.conv_general_dilated`` (its other arguments in ``kwargs``), through oneDNN where
    :func:`cpu_kernels.uses_native` and the call is one it covers (module docstring)."""
    rhs_dilation = tuple(rhs_dilation or (1, 1))
    if _onednn_covers(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count, kwargs):
        if isinstance(padding, str):
            dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dilation, strict=True)]
            padding = lax.padtype_to_pads(lhs.shape[1:3], dilated, window_strides, padding)
        geometry = _Geometry(tuple(window_strides), rhs_dilation, tuple(tuple(p) for p in padding))
        if min(min(p) for p in geometry[2]) >= 0 and min(geometry.output_hw(lhs.shape, rhs.shape)) > 0:
            return onednn_conv(lhs, rhs, geometry)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, **kwargs,
    )  # fmt: skip


def _onednn_covers(lhs, rhs, lhs_dilation, dimension_numbers, groups, kwargs):
    """Whether oneDNN's route takes this call: 2D NHWC / HWIO, one float32 or bfloat16 dtype, no input
    dilation, groups, other output dtype or output sharding, and :func:`cpu_kernels.uses_native`."""
    if (
        lhs.ndim != 4
        or rhs.ndim != 4
        or lhs.dtype != rhs.dtype
        or str(lhs.dtype) not in ("float32", "bfloat16")
    ):
        return False
    if tuple(lhs_dilation or (1, 1)) != (1, 1) or groups != 1 or kwargs.get("batch_group_count", 1) != 1:
        return False
    if (
        kwargs.get("preferred_element_type") not in (None, lhs.dtype)
        or kwargs.get("out_sharding") is not None
    ):
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return given == nhwc and cpu_kernels.uses_native()


class _Geometry(tuple):
    """``(strides, dilation, padding)``: a hashable static argument of :func:`onednn_conv`."""

    def __new__(cls, strides, dilation, padding):
        return super().__new__(cls, (strides, dilation, padding))

    @property
    def attributes(self) -> dict[str, np.ndarray]:
        strides, dilation, padding = self
        pairs = {"strides": strides, "dilation": dilation}
        pairs |= {"pad_lo": [p[0] for p in padding], "pad_hi": [p[1] for p in padding]}
        return {k: np.asarray(v, np.int64) for k, v in pairs.items()}

    def output_hw(self, x_shape, w_shape) -> tuple[int, int]:
        strides, dilation, padding = self
        return tuple(
            (x_shape[1 + i] + sum(padding[i]) - dilation[i] * (w_shape[i] - 1) - 1) // strides[i] + 1
            for i in range(2)
        )


def _call(target: str, shape, dtype, *operands, geometry: _Geometry):
    out = jax.ShapeDtypeStruct(shape, dtype)
    return cpu_kernels.ffi_call("oneDNN convolution", target, out, *operands, **geometry.attributes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def onednn_conv(x: jax.Array, w: jax.Array, geometry: _Geometry) -> jax.Array:
    """oneDNN's convolution of ``x`` (N, H, W, C) with ``w`` (KH, KW, C, O) -> (N, OH, OW, O), one dtype."""
    oh, ow = geometry.output_hw(x.shape, w.shape)
    return _call(library.CONV_FORWARD, (x.shape[0], oh, ow, w.shape[3]), x.dtype, x, w, geometry=geometry)


def _forward(x, w, geometry):
    return onednn_conv(x, w, geometry), (x, w)


def _backward(geometry, residuals, dy):
    x, w = residuals
    dx = _call(library.CONV_BACKWARD_DATA, x.shape, x.dtype, dy, w, geometry=geometry)
    dw = _call(library.CONV_BACKWARD_WEIGHTS, w.shape, w.dtype, x, dy, geometry=geometry)
    return dx, dw


onednn_conv.defvjp(_forward, _backward)
