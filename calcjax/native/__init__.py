"""Native CPU kernels for JAX's CPU backend through XLA's FFI: oneDNN's convolutions and a BatchNorm-ReLU.

``onednn_kernels.cc`` and ``batchnorm_kernels.cc`` are the sources; ``python -m calcjax.native.build`` (run by
``make install``) compiles them against the installed jaxlib's FFI headers and the ``onednn-cpu-gomp`` wheel
into ``libcalcjax_cpu.so`` beside them; :mod:`calcjax.native.library` loads it and registers its handlers
with JAX.
"""
