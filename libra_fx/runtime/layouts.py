"""What a decode step on a compressed KV cache needs from its prefill: one :class:`DecodeLayout` per
cache a compressed prefill returned, kept by the model's :class:`~libra_fx.runtime.compiled_model.CompiledModel`.

The compressed graph returns what decode needs as side outputs; the layout keeps it per returned KV
cache, and completes every later step on that cache::

    prefill   out = forward(...)        side outputs {empty_slots | source, valid, positions}  →  layouts[out.cache]
    decode    forward(..., cache=c)     kwargs + libra_empty_slots | the compressed prompt's 2-D mask
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from libra_fx.errors import UnsupportedGraph
from libra_fx.runtime.compat import past_window, prompt_tokens
from libra_fx.sequence.decode import compressed_prompt_kwargs, position_shift


@dataclass
class DecodeLayout:
    """What steps on one compressed cache need (each part ``None`` when the prefill had none)."""

    empty_slots: torch.Tensor | None = None  # [num_layers, B] empty slots in front, per layer
    prompt_len: int | None = None  # the uncompressed prompt's length (vision-side stages)
    keep: torch.Tensor | None = None  # [B, T'] False on the compressed prompt's padding (slots and pads)
    shift: torch.Tensor | None = None  # [B] the compressed prompt's last position id minus the original's
    prompt_cached: int = 0  # entries of the first attention layer (full length) after the prefill
    removed: tuple[int | None, ...] = ()  # per layer: how many fewer entries than that layer it holds (None: no
    # entries per token, e.g. a linear-attention or convolution layer's state)


class DecodeLayouts:
    """The layouts of one model's compressed caches, each kept for as long as its cache lives."""

    def __init__(self):
        self._by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def complete(self, cache, kwargs: dict) -> dict:
        """The kwargs of a step on ``cache``, completed for its compressed layout (unchanged for a cache
        libra-fx did not compress, or an empty one)."""
        layout = self._by_cache.get(cache) if cache is not None else None
        if layout is None or cache.get_seq_length() == 0:
            return kwargs
        check_window(cache, kwargs)
        align_cropped_layers(cache, layout)
        if layout.keep is not None:
            kwargs = compressed_prompt_kwargs(kwargs, layout.prompt_len, layout.keep, cache.get_seq_length(),
                                              layout.shift)
        if layout.empty_slots is not None:
            kwargs = dict(kwargs, libra_empty_slots=layout.empty_slots)
        return kwargs

    def keep(self, cache, side_outputs: dict, args: tuple, kwargs: dict) -> None:
        """Keep the layout of ``cache``, which a compressed prefill (``args``, ``kwargs``) returned with
        ``side_outputs``."""
        lengths = [_entries(layer) for layer in cache.layers]
        full = _full_length(lengths)
        layout = DecodeLayout(prompt_cached=full, removed=tuple(None if n is None else full - n for n in lengths))
        layout.empty_slots = side_outputs.get("empty_slots")
        if "valid" in side_outputs:
            mask = kwargs.get("attention_mask")
            valid, source = side_outputs["valid"], side_outputs["source"]
            layout.keep = valid if mask is None else valid & mask.bool().gather(1, source)
            layout.prompt_len = prompt_tokens(args, kwargs).shape[1]
            layout.shift = position_shift(side_outputs["positions"], layout.prompt_len)
        self._by_cache[cache] = layout


def check_window(cache, kwargs: dict) -> None:
    """Decode past a sliding window on a compressed cache is not exact yet (contract §5): refuse it."""
    window = past_window(cache, prompt_tokens((), kwargs).shape[1])
    if window is not None:
        raise UnsupportedGraph(
            f"libra_fx: this decode step reaches position {cache.get_seq_length()} of a compressed cache whose "
            f"sliding-window layers (window {window}) count the window in original positions; decoding past the "
            "window is not supported yet. Keep prompt + new tokens within the window, or compress fewer layers")


def align_cropped_layers(cache, layout: DecodeLayout) -> None:
    """Keep each layer ``layout.removed`` entries shorter than the first attention layer after a crop.

    Assisted generation and prompt lookup drop rejected candidates with ``cache.crop``. A crop by count
    (transformers ≥ 5.2x) keeps the layers' differences; a crop to an absolute length (earlier 5.x)
    leaves the shorter, compressed layers too long. Their extra entries are the newest tokens, so they
    are cropped by count here. A crop into the prompt cannot be mapped onto a compressed layer: ``ValueError``.
    """
    full = _full_length(map(_entries, cache.layers))
    if full < layout.prompt_cached:
        raise ValueError(f"libra_fx: this KV cache was cropped to {full} entries, into its compressed prompt "
                         f"({layout.prompt_cached} entries in its full-length layers); crop only tokens generated after the prompt")
    for index, (layer, removed) in enumerate(zip(cache.layers, layout.removed)):
        if removed is None or getattr(layer, "sliding_window", None):
            continue  # a recurrent state; or by count, up to its window: check_window refuses a step past it
        extra = layer.get_seq_length() - (full - removed)
        if extra < 0:
            raise ValueError(f"libra_fx: layer {index} of this compressed KV cache holds {-extra} entries fewer than "
                             "the prefill left it relative to the full-length layers; it was cropped by something libra-fx cannot follow")
        if extra:
            layer.crop(-extra)


def _entries(layer) -> int | None:
    """A cache layer's entries per token (``None``: a layer that keeps a state, not one entry per token)."""
    return layer.get_seq_length() if hasattr(layer, "get_seq_length") else None


def _full_length(lengths) -> int:
    """The entries of the first layer that has entries per token: an attention layer, and no stage is
    before it, so it holds the full sequence."""
    return next(n for n in lengths if n is not None)
