"""calcjax.io: reading and describing CT data (no jax imports here)."""
