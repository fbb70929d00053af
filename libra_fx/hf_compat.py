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


def prompt_tokens(args: tuple, kwargs: dict):
    """The forward's ``[B, T, …]`` token input: ``input_ids`` (by name or first positional), else
    ``inputs_embeds`` (``None`` when there is neither)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if ids is not None else kwargs.get("inputs_embeds")


def past_window(cache, new_tokens: int) -> int | None:
    """The window of a sliding-window layer of ``cache`` that this step's last query position reaches
    or passes (``None`` when there is none). Such a layer keeps its last ``window − 1`` entries by
    count, and after compression its entries are no longer its last positions."""
    layers = getattr(cache, "layers", ())
    last = cache.get_seq_length() + new_tokens - 1
    windows = [w for w in (getattr(layer, "sliding_window", None) for layer in layers) if w and last >= w]
    return min(windows) if windows else None
