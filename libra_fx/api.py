"""``libra_fx.compile``: the one call that makes ``model(...)`` and ``model.generate(...)`` compress.

::

    model = libra_fx.compile(model, ratio=0.5, layers=(7, 15, 23))
    out = model.generate(**inputs, max_new_tokens=64)

It checks the settings against the model, switches the language model to the ``libra|…``
attention (see :mod:`libra_fx.attention`), and replaces ``model.forward`` by a compiled forward
using :func:`libra_fx.backend`; ``generate`` calls ``self.forward``, so prefill and decode both go
through the backend. Prefill is rewritten; decode steps hold no visual tokens and are compiled as
they are, each layer attending to its own (full or compressed) KV cache.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache

from libra_fx import vision_layout
from libra_fx.attention import use_libra_attention
from libra_fx.dynamo_backend import LibraBackend
from libra_fx.ragged import pass_empty_slots
from libra_fx.hf_compat import kv_cache
from libra_fx.methods import is_vision_method
from libra_fx.models import check_architecture


def num_decoder_layers(model) -> int:
    config = getattr(model.config, "text_config", model.config)
    return config.num_hidden_layers


def compile(model, ratio=0.5, layers=(7, 15, 23), method="libra", tau=0.7, eta="mean", strict=False, *,
            compiler="inductor", fullgraph=False):  # noqa: A001  (mirrors torch.compile)
    """Compile ``model.forward`` with the libra backend in place; returns ``model``.

    Raises ``ValueError`` at once for a wrong setting, including a layer index beyond the
    model's decoder. A model class outside :data:`libra_fx.models.SUPPORTED` is compiled
    uncompressed, with a ``LibraFallbackWarning`` naming it (``strict=True``: ``UnsupportedGraph``).
    The backend is ``model.libra_backend`` (its ``records`` say what happened).
    Prompts of new lengths recompile once, then share a graph with a symbolic length
    (Dynamo's automatic dynamic shapes): two prefill and two decode graphs in all.
    ``fullgraph=False`` (the default) lets the vision code of LLaVA-NeXT and Qwen2-VL break the
    graph; the graph that holds the visual tokens and the decoder is compressed. Only the default
    dynamic KV cache is supported (``ValueError`` for a static one).
    """
    be = LibraBackend(ratio, layers, method, tau, eta, strict, compiler=compiler)
    be.skip_reason = check_architecture(model, strict)
    model.libra_backend = be
    if be.skip_reason is not None:
        model.forward = torch.compile(model.forward, backend=be, fullgraph=fullgraph)
        return model
    num_layers = num_decoder_layers(model)
    be.config.check_layers(num_layers)
    be.ragged_batches = True  # the forward below passes the decode masks of ragged batches
    use_libra_attention(model)
    skip_feature_count_message(model)
    compiled = torch.compile(model.forward, backend=be, fullgraph=fullgraph)

    vision_side = is_vision_method(be.config.method)

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        check_cache(kv_cache(kwargs))
        kwargs = pass_empty_slots(model, be.config, num_layers, precompute_mrope_positions(model, kwargs))
        with torch._dynamo.config.patch(capture_scalar_outputs=True):  # no break at feature-count checks
            if vision_side:  # PruMerge: decode steps see the compressed prompt's layout (libra_fx.vision_layout)
                return vision_layout.call_compiled(compiled, be, args, kwargs)
            return compiled(*args, **kwargs)

    if vision_side:  # keep the vision tower inside the compiled forward under generate()
        forward.__signature__ = vision_layout.signature_for_generate(model.forward)
    model.forward = forward
    return model


def precompute_mrope_positions(model, kwargs: dict) -> dict:
    """Qwen2-VL-style models work out their 3-D (M-RoPE) position ids inside ``forward`` with
    data-dependent loops, whose graph breaks cut the visual tokens off from the decoder.
    ``generate`` passes them in; for a plain ``model(...)`` prefill they are computed here the same
    way, by the model's own ``compute_3d_position_ids``, before the compiled forward."""
    compute = getattr(getattr(model, "model", None), "compute_3d_position_ids", None)
    cache = kv_cache(kwargs)
    if (compute is None or kwargs.get("position_ids") is not None or kwargs.get("input_ids") is None
            or cache is not None and cache.get_seq_length() > 0
            or kwargs.get("image_grid_thw") is None and kwargs.get("video_grid_thw") is None):
        return kwargs
    names = ("input_ids", "image_grid_thw", "video_grid_thw", "attention_mask", "mm_token_type_ids")
    return dict(kwargs, position_ids=compute(inputs_embeds=None, **{k: kwargs.get(k) for k in names}))


def check_cache(cache) -> None:
    """Only a dynamic cache can hold layers of different lengths (full before a stage, shorter after)."""
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"libra_fx: the KV cache {type(cache).__name__} keeps every layer at one length, written by "
            "position, and cannot hold a compressed sequence; use the default dynamic cache (do not pass "
            "cache_implementation='static' or a StaticCache to generate)"
        )


class _FeatureCount:
    """Stands in for the visual features in ``get_placeholder_mask``: the same ``numel()`` (so
    the count is still checked), and a constant ``shape`` for the error message."""

    shape = (-1, 1)

    def __init__(self, features):
        self.features = features

    def numel(self):
        return self.features.numel()


def skip_feature_count_message(model) -> None:
    """Let images of a new size share the compiled graph (one recompile, then a symbolic size).

    ``get_placeholder_mask(input_ids, inputs_embeds, image_features, …)`` checks the feature
    count with an error message that formats ``image_features.shape[0]``; formatting a symbolic
    size makes Dynamo specialise it, so every image size would recompile. On this model instance
    the features are handed over as :class:`_FeatureCount`: the same check, a constant message.
    """
    base = getattr(model, "model", None)
    method = getattr(base, "get_placeholder_mask", None)
    if method is None or getattr(method, "libra_fx", False):
        return

    def get_placeholder_mask(input_ids, inputs_embeds, *features, **named):
        features = [None if f is None else _FeatureCount(f) for f in features]
        named = {k: None if f is None else _FeatureCount(f) for k, f in named.items()}
        return method(input_ids, inputs_embeds, *features, **named)

    get_placeholder_mask.libra_fx = True
    base.get_placeholder_mask = get_placeholder_mask
