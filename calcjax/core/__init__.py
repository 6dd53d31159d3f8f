"""calcjax.core."""
