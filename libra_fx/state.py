"""The per-model state that lives between a compressed prefill and its decode steps.

One :class:`ModelState` per compiled model (``libra_fx.compile`` makes it; a bare backend owns one
that serves no decode). The compressed graph returns what decode needs as side outputs; the state
keeps it per returned KV cache, and completes every later step on that cache::

    prefill   out = forward(...)        side outputs {empty_slots | source, valid, positions}  →  layouts[out.cache]
    decode    forward(..., cache=c)     kwargs + libra_empty_slots | the compressed prompt's 2-D mask

A prefill the passes' contract cannot serve runs the uncompressed model instead, with a warning
(:meth:`ModelState.uncompressed_reason`): one that carries assisted generation's candidate tokens, or
a batch with a sample that is all padding under an attention that averages fully masked rows.

No module globals, nothing set on transformers' objects: two compiled models never share state.
"""

from __future__ import annotations

import contextlib
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
    prompt_cached: int = 0  # entries of the first attention layer (full length) after the prefill
    removed: tuple[int | None, ...] = ()  # per layer: how many fewer entries than that layer it holds (None: no
    # entries per token, e.g. a linear-attention or convolution layer's state)


class ModelState:
    """``family``: the model's adapter (``None``: recognised per graph). ``refused``: why the model is
    not compressed at all. ``serves_decode``: whether the forward around the graph calls
    :meth:`before_call` / :meth:`after_call` (``libra_fx.compile``'s does); a prefill with images that
    ran no compressed graph then warns once (``strict``: raises)."""

    def __init__(self, family=None, refused: str | None = None, serves_decode: bool = False, strict: bool = False):
        self.family, self.refused, self.serves_decode, self.strict = family, refused, serves_decode, strict
        self.attention = "sdpa"  # the language model's own attention implementation (libra_fx.compile sets it)
        self.generate_prompt: int | None = None  # the prompt length of the generate() in progress
        self.side_outputs: dict[str, object] | None = None  # of the newest compressed run
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache → DecodeLayout
        self.graphs_run: list[bool] = []  # this call's compiled graphs: whether each was compressed
        self.call_refused: str | None = None  # why this call's inputs are not compressed
        self.prefill = False  # whether this call started on an empty cache
        self.warned_uncompressed = False

    def before_call(self, kwargs: dict, refused: str | None = None) -> dict:
        """Forget the last side outputs; complete the kwargs of a step on a compressed cache.
        ``refused``: why this call's inputs are not compressed (graphs compiled for it are left as they are)."""
        self.side_outputs, self.graphs_run, self.call_refused = None, [], refused
        cache = kv_cache(kwargs)
        self.prefill = cache is None or cache.get_seq_length() == 0  # (the call fills the cache it is given)
        layout = self._layouts.get(cache) if cache is not None else None
        if layout is not None and cache.get_seq_length() > 0:
            self._check_window(cache, kwargs)
            align_cropped_layers(cache, layout)
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
        lengths = [_entries(layer) for layer in cache.layers]
        full = _full_length(lengths)
        layout = DecodeLayout(prompt_cached=full, removed=tuple(None if n is None else full - n for n in lengths))
        if "empty_slots" in side:
            layout.empty_slots = side["empty_slots"]
        if "valid" in side:
            mask = kwargs.get("attention_mask")
            valid, source = side["valid"], side["source"]
            layout.keep = valid if mask is None else valid & mask.bool().gather(1, source)
            layout.prompt_len = prompt_tokens(args, kwargs).shape[1]
            layout.shift = position_shift(side["positions"], layout.prompt_len)
        self._layouts[cache] = layout

    @contextlib.contextmanager
    def generating(self, prompt: torch.Tensor | None):
        """Around one ``generate()``: its prompt's length, by which a prefill that also carries
        candidate tokens is told apart (:meth:`uncompressed_reason`)."""
        saved, self.generate_prompt = self.generate_prompt, None if prompt is None else prompt.shape[1]
        try:
            yield
        finally:
            self.generate_prompt = saved

    def uncompressed_reason(self, args: tuple, kwargs: dict) -> str | None:
        """Why this prefill must run the uncompressed model (``None``: it need not); warns (``strict``: raises).

        - the family refuses these inputs (``FamilyAdapter.refused_inputs``, given to :meth:`before_call`);
        - assisted generation runs the prompt and the draft's candidates in one forward: the importance
          query would be a candidate, not the prompt's last token (contract §2);
        - a sample that is all padding has only fully masked rows: SDPA gives them zeros, before and
          after compression alike, but eager attention averages every value, which compression changes.
        """
        if self.refused is not None or not self.prefill:  # (before_call has set it for this call)
            return None
        why = self.call_refused or self._prefill_not_compressible(args, kwargs)
        if why is not None:
            message = f"libra_fx: {why}"
            if self.strict:
                raise UnsupportedGraph(message)
            warnings.warn(message, LibraFallbackWarning, stacklevel=4)
        return why

    def _prefill_not_compressible(self, args: tuple, kwargs: dict) -> str | None:
        tokens, mask = prompt_tokens(args, kwargs), kwargs.get("attention_mask")
        if kv_cache(kwargs) is not None and self.generate_prompt is not None and tokens.shape[1] > self.generate_prompt:
            return (f"this generate() runs its prompt together with {tokens.shape[1] - self.generate_prompt} candidate "
                    "token(s) in one forward (assisted generation), so the importance query would be a candidate, not "
                    "the prompt's last token; the prompt is not compressed")
        if self.attention != "sdpa" and mask is not None and mask.dim() == 2 and not mask.any(-1).all():
            empty = (~mask.bool().any(-1)).nonzero().flatten().tolist()
            return (f"sample(s) {empty} of this batch are all padding (an all-zero attention_mask); {self.attention} "
                    "attention averages the values of a fully masked row, which compression would change, so the "
                    "batch runs uncompressed")
        return None

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
        images = any(v is not None for k, v in kwargs.items() if k.startswith(("pixel_values", "mm_encoder_outputs")))
        if (self.refused is not None or not images or any(self.graphs_run)
                or self.warned_uncompressed or not self.prefill):
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
            continue  # a recurrent state; or by count, up to its window: _check_window refuses a step past it
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
