"""Loads ``libcalcjax_onednn.so`` and registers its convolution handlers with JAX's CPU backend.

Targets (XLA FFI, ``platform="cpu"``): :data:`FORWARD` (x, w -> y), :data:`BACKWARD_DATA` (dy, w -> dx),
:data:`BACKWARD_WEIGHTS` (x, dy -> dw); operands NHWC / HWIO, float32 or bfloat16; attributes ``strides``,
``dilation``, ``pad_lo``, ``pad_hi`` (int64 pairs, height then width). :func:`available` loads once and
says whether they are registered; :func:`unavailable_reason` says why not.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

from calcjax.native.build import DNNL_LIBRARY, LIBRARY

# ``xla`` here turns the kernels off (calcjax.model.conv reads it); named here, where importing costs no jax.
CPU_CONV_ENV = "CALCJAX_CPU_CONV"
FORWARD = "calcjax_onednn_conv_forward"
BACKWARD_DATA = "calcjax_onednn_conv_backward_data"
BACKWARD_WEIGHTS = "calcjax_onednn_conv_backward_weights"
_SYMBOLS = {
    FORWARD: "CalcjaxConvForward",
    BACKWARD_DATA: "CalcjaxConvBackwardData",
    BACKWARD_WEIGHTS: "CalcjaxConvBackwardWeights",
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
    """Whether the oneDNN handlers are loaded and registered (loads them on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the handlers are not available, or ``None`` when they are."""
    return _load()
