"""calcjax.inference.predictor."""
