"""calcjax: coronary artery calcium scoring on chest and cardiac CT in JAX/Flax."""

__version__ = "0.1.0"
