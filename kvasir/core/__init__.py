"""Scheduler, KV block pool, prefix cache and request state. Pure Python: never torch."""
