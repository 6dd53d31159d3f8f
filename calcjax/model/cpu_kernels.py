"""Which kernels the network's convolutions and training-mode BatchNorm-ReLUs trace to on a CPU.

``native`` (the default): calcjax's own (:mod:`calcjax.native`: oneDNN's convolutions,
:mod:`calcjax.model.batchnorm`'s fused BatchNorm-ReLU) where :func:`uses_native` holds; ``xla``: XLA's,
chosen with ``$CALCJAX_CPU_KERNELS=xla`` or inside a :func:`xla_kernels` block. Accelerators always run
XLA's. The choice is read when a function is traced: a ``jax.jit`` function traced before keeps its trace.
"""

from __future__ import annotations

import contextlib
import os

import jax

from calcjax.native import library

CPU_KERNELS_ENV = library.CPU_KERNELS_ENV
CHOICES = ("native", "xla")
_forced: list[str] = []


def choice() -> str:
    """The innermost :func:`xla_kernels` block's ``xla``, else ``$CALCJAX_CPU_KERNELS`` (``native``, the
    default, or ``xla``); any other value is an error."""
    if _forced:
        return _forced[-1]
    value = os.environ.get(CPU_KERNELS_ENV, "native").strip().lower() or "native"
    if value not in CHOICES:
        raise ValueError(f"${CPU_KERNELS_ENV}={value!r}: must be one of {', '.join(CHOICES)}")
    return value


@contextlib.contextmanager
def xla_kernels():
    """Within the block, convolutions and BatchNorms traced go to XLA's kernels (e.g. for XLA's FLOP count,
    which does not see inside a custom call)."""
    _forced.append("xla")
    try:
        yield
    finally:
        _forced.pop()


def uses_native() -> bool:
    """Whether operations traced now go to the native kernels: the choice ``native``, the CPU backend with
    one device, and the native library loaded.

    One device: XLA's partitioner does not know a custom call's sharding and would gather a batch sharded
    over several devices onto each of them, so a CPU process with several devices (the data-parallel tests,
    ``--xla_force_host_platform_device_count``) runs XLA's kernels on all of them.
    """
    if choice() != "native" or jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    return library.available()


def ffi_call(what: str, target: str, outputs, *operands, **attributes):
    """The native handler ``target`` (:mod:`calcjax.native.library`) on ``operands``, giving ``outputs``
    (``jax.ShapeDtypeStruct`` or a tuple of them); vmapped, it runs once per element. Raises naming
    ``what`` and why when the library is not loaded."""
    if not library.available():
        raise RuntimeError(f"{what}: {library.unavailable_reason()}")
    return jax.ffi.ffi_call(target, outputs, vmap_method="sequential")(*operands, **attributes)
