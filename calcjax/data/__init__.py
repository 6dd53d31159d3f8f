"""calcjax.data."""
