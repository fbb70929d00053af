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

from libra_fx.attention import use_libra_attention
from libra_fx.dynamo_backend import LibraBackend


def num_decoder_layers(model) -> int:
    config = getattr(model.config, "text_config", model.config)
    return config.num_hidden_layers


def compile(model, ratio=0.5, layers=(7, 15, 23), method="libra", tau=0.7, eta="mean", strict=False, *,
            compiler="inductor", fullgraph=True):  # noqa: A001  (mirrors torch.compile)
    """Compile ``model.forward`` with the libra backend in place; returns ``model``.

    Raises ``ValueError`` at once for a wrong setting, including a layer index beyond the
    model's decoder. The backend is ``model.libra_backend`` (its ``records`` say what happened).
    Prompts of new lengths recompile once, then share a graph with a symbolic length
    (Dynamo's automatic dynamic shapes): two prefill and two decode graphs in all.
    ``fullgraph=True`` (the default) traces prefill as one graph; pass ``False`` for a model whose
    forward has graph breaks. Only the default dynamic KV cache is supported (``ValueError``
    for a static one).
    """
    be = LibraBackend(ratio, layers, method, tau, eta, strict, compiler=compiler)
    be.config.check_layers(num_decoder_layers(model))
    use_libra_attention(model)
    compiled = torch.compile(model.forward, backend=be, fullgraph=fullgraph)

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        check_cache(kwargs.get("past_key_values"))
        return compiled(*args, **kwargs)

    model.forward = forward
    model.libra_backend = be
    return model


def check_cache(cache) -> None:
    """Only a dynamic cache can hold layers of different lengths (full before a stage, shorter after)."""
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"libra_fx: the KV cache {type(cache).__name__} keeps every layer at one length, written by "
            "position, and cannot hold a compressed sequence; use the default dynamic cache (do not pass "
            "cache_implementation='static' or a StaticCache to generate)"
        )
