"""calcjax: coronary artery calcium scoring on chest and cardiac CT in JAX/Flax.

The package is organised by pipeline stage (docs/ARCHITECTURE.md). Its Python API for one volume,
``calcjax.score_volume(hu, spacing)``, is imported on first use, so that ``import calcjax.io...`` in a
reader process stays free of jax.
"""

from calcjax.core.version import VERSION as __version__

__all__ = ["VolumeScore", "__version__", "score_volume"]


def __getattr__(name: str):
    if name in ("score_volume", "VolumeScore"):
        from calcjax.score import api

        return getattr(api, name)
    raise AttributeError(f"module 'calcjax' has no attribute {name!r}")
