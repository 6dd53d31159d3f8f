"""Native CPU kernels: oneDNN convolutions for JAX's CPU backend through XLA's FFI.

``onednn_kernels.cc`` is the source; ``python -m calcjax.native.build`` (run by ``make install``) compiles it
against the installed jaxlib's FFI headers and the ``onednn-cpu-gomp`` wheel into ``libcalcjax_onednn.so``
beside it; :mod:`calcjax.native.onednn` loads it and registers its handlers with JAX.
"""
