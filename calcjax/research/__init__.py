"""calcjax.research."""
