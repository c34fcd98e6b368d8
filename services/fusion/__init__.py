"""Fusion rules and the pure functions that turn member outputs into final answers.

Imported by the gateway (online requests) and by services (shard jobs), so one implementation
makes every final answer.
"""
