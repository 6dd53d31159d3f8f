"""calcjax.train."""
