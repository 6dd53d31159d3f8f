"""calcjax.score."""
