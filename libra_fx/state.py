"""The per-model state that lives between a compressed prefill and its decode steps.

One :class:`ModelState` per compiled model (``libra_fx.compile`` makes it; a bare backend owns one
that serves no decode). The compressed graph returns what decode needs as side outputs; the state
keeps it per returned KV cache, and completes every later step on that cache::

    prefill   out = forward(...)        side outputs {empty_slots | source, valid, positions}  →  layouts[out.cache]
    decode    forward(..., cache=c)     kwargs + libra_empty_slots | the compressed prompt's 2-D mask

No module globals, nothing set on transformers' objects: two compiled models never share state.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch

from libra_fx.errors import LibraFallbackWarning, UnsupportedGraph
from libra_fx.hf_compat import kv_cache, past_window, prompt_tokens, returned_cache
from libra_fx.sequence.decode import compressed_prompt_kwargs, position_shift


@dataclass
class DecodeLayout:
    """What steps on one compressed cache need (each part ``None`` when the prefill had none); one is
    kept for every cache a compressed prefill returned."""

    empty_slots: torch.Tensor | None = None  # [num_layers, B] empty slots in front, per layer
    prompt_len: int | None = None  # the uncompressed prompt's length (vision-side stages)
    keep: torch.Tensor | None = None  # [B, T'] False on the compressed prompt's padding (slots and pads)
    shift: torch.Tensor | None = None  # [B] the compressed prompt's last position id minus the original's


class ModelState:
    """``family``: the model's adapter (``None``: recognised per graph). ``refused``: why the model is
    not compressed at all. ``serves_decode``: whether the forward around the graph calls
    :meth:`before_call` / :meth:`after_call` (``libra_fx.compile``'s does); a prefill with images that
    ran no compressed graph then warns once (``strict``: raises)."""

    def __init__(self, family=None, refused: str | None = None, serves_decode: bool = False, strict: bool = False):
        self.family, self.refused, self.serves_decode, self.strict = family, refused, serves_decode, strict
        self.side_outputs: dict[str, object] | None = None  # of the newest compressed run
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache → DecodeLayout
        self.graphs_run: list[bool] = []  # this call's compiled graphs: whether each was compressed
        self.call_refused: str | None = None  # why this call's inputs are not compressed
        self.warned_uncompressed = False

    def before_call(self, kwargs: dict, refused: str | None = None) -> dict:
        """Forget the last side outputs; complete the kwargs of a step on a compressed cache.
        ``refused``: why this call's inputs are not compressed (graphs compiled for it are left as they are)."""
        self.side_outputs, self.graphs_run, self.call_refused = None, [], refused
        cache = kv_cache(kwargs)
        layout = self._layouts.get(cache) if cache is not None else None
        if layout is not None and cache.get_seq_length() > 0:
            self._check_window(cache, kwargs)
        if layout is None or cache.get_seq_length() == 0:
            return kwargs
        if layout.keep is not None:
            kwargs = compressed_prompt_kwargs(kwargs, layout.prompt_len, layout.keep, cache.get_seq_length(),
                                              layout.shift)
        if layout.empty_slots is not None:
            kwargs = dict(kwargs, libra_empty_slots=layout.empty_slots)
        return kwargs

    def after_call(self, args: tuple, kwargs: dict, out) -> None:
        """Keep the layout of the cache a compressed prefill returned."""
        self._check_compressed(kwargs)
        side, cache = self.side_outputs or {}, returned_cache(out)
        if cache is None or not any(self.graphs_run):
            return
        layout = DecodeLayout()
        if "empty_slots" in side:
            layout.empty_slots = side["empty_slots"]
        if "valid" in side:
            mask = kwargs.get("attention_mask")
            valid, source = side["valid"], side["source"]
            layout.keep = valid if mask is None else valid & mask.bool().gather(1, source)
            layout.prompt_len = prompt_tokens(args, kwargs).shape[1]
            layout.shift = position_shift(side["positions"], layout.prompt_len)
        self._layouts[cache] = layout

    @staticmethod
    def _check_window(cache, kwargs: dict) -> None:
        """Decode past a sliding window on a compressed cache is not exact yet (contract §5): refuse it."""
        window = past_window(cache, prompt_tokens((), kwargs).shape[1])
        if window is not None:
            raise UnsupportedGraph(
                f"libra_fx: this decode step reaches position {cache.get_seq_length()} of a compressed cache whose "
                f"sliding-window layers (window {window}) count the window in original positions; decoding past the "
                "window is not supported yet. Keep prompt + new tokens within the window, or compress fewer layers")

    def _check_compressed(self, kwargs: dict) -> None:
        """Warn (once per model) when a prefill with images ran, but no compressed graph did: Dynamo
        skipped the frame or hit its recompile limit, or no graph with visual tokens reached the decoder."""
        cache = kv_cache(kwargs)
        images = any(v is not None for k, v in kwargs.items() if k.startswith(("pixel_values", "mm_encoder_outputs")))
        if (self.refused is not None or self.call_refused is not None or not images or any(self.graphs_run)
                or self.warned_uncompressed or cache is not None and cache.get_seq_length() > 0):
            return
        if not self.graphs_run:
            why = ("Dynamo ran the forward without calling the libra backend: it skips this frame, or the forward hit "
                   "torch._dynamo.config.recompile_limit (raise it, or compile once and call libra_fx.compile "
                   "again on the same model to change settings)")
        else:
            why = ("no compiled graph with visual tokens reached the decoder (each graph was left as it is: see "
                   "model.libra_backend.records)")
        self.warned_uncompressed = True
        message = f"libra_fx: this forward had images but ran uncompressed: {why}"
        if self.strict:
            raise UnsupportedGraph(message)
        warnings.warn(message, LibraFallbackWarning, stacklevel=4)
