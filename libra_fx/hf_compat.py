"""Names that differ between the transformers versions libra-fx supports (5.17 … 5.x).

transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` → ``cache``.
"""

from __future__ import annotations


def kv_cache(kwargs: dict):
    """The KV cache handed to a forward, under either name (``None`` when there is none)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def returned_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
