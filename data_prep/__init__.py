"""Offline data tools: the CT phantom generator and the shard builder.

Depends on calcjax, never the reverse.
"""
