"""ml_collections configs (big_vision style: one ``get_config()`` per file)."""
