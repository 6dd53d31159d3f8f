"""Loads ``libcalcjax_cpu.so`` and registers its handlers with JAX's CPU backend.

Targets (XLA FFI, ``platform="cpu"``):

- oneDNN's convolution (``onednn_kernels.cc``): :data:`CONV_FORWARD` (x, w -> y), :data:`CONV_BACKWARD_DATA`
  (dy, w -> dx), :data:`CONV_BACKWARD_WEIGHTS` (x, dy -> dw); operands NHWC / HWIO, float32 or bfloat16;
  attributes ``strides``, ``dilation``, ``pad_lo``, ``pad_hi`` (int64 pairs, height then width);
- BatchNorm in training mode with the ReLU after it (``batchnorm_kernels.cc``): :data:`BN_RELU_FORWARD`
  (x, scale, bias -> y, mean, var), :data:`BN_RELU_BACKWARD` (dy, x, scale, bias, mean, var, dmean, dvar
  -> dx, dscale, dbias); float32, channels last; attribute ``epsilon`` (float32).

:func:`available` loads once and says whether they are registered; :func:`unavailable_reason` says why not.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

from calcjax.native.build import DNNL_LIBRARY, LIBRARY

# ``xla`` here turns the kernels off (calcjax.model.cpu_kernels reads it); named here, where importing costs
# no jax.
CPU_KERNELS_ENV = "CALCJAX_CPU_KERNELS"
CONV_FORWARD = "calcjax_onednn_conv_forward"
CONV_BACKWARD_DATA = "calcjax_onednn_conv_backward_data"
CONV_BACKWARD_WEIGHTS = "calcjax_onednn_conv_backward_weights"
BN_RELU_FORWARD = "calcjax_batchnorm_relu_forward"
BN_RELU_BACKWARD = "calcjax_batchnorm_relu_backward"
_SYMBOLS = {
    CONV_FORWARD: "CalcjaxConvForward",
    CONV_BACKWARD_DATA: "CalcjaxConvBackwardData",
    CONV_BACKWARD_WEIGHTS: "CalcjaxConvBackwardWeights",
    BN_RELU_FORWARD: "CalcjaxBatchNormReluForward",
    BN_RELU_BACKWARD: "CalcjaxBatchNormReluBackward",
}


@functools.cache
def _load() -> str | None:
    """Loads oneDNN (by its path under ``sys.prefix``, so a moved environment still finds it) and the
    handlers, registers them; returns ``None``, or why it could not."""
    if not LIBRARY.is_file():
        return f"{LIBRARY} is not built (make install, or python -m calcjax.native.build)"
    try:
        dnnl = Path(sys.prefix, "lib", DNNL_LIBRARY)
        if dnnl.is_file():
            ctypes.CDLL(str(dnnl))  # local: its symbols stay out of the global scope (torch)
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError as e:
        return f"loading {LIBRARY.name} failed: {e}"
    import jax

    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def available() -> bool:
    """Whether the handlers are loaded and registered (loads them on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the handlers are not available, or ``None`` when they are."""
    return _load()
