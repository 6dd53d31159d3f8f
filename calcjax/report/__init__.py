"""calcjax.report.markdown."""
