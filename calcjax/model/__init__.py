"""calcjax.model.network."""
