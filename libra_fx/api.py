"""``libra_fx.compile``: the one call that makes ``model(...)`` and ``model.generate(...)`` compress.

::

    model = libra_fx.compile(model, ratio=0.5, layers=(7, 15, 23))
    out = model.generate(**inputs, max_new_tokens=64)

It checks the settings against the model, switches the language model to the ``libra|…``
attention (:mod:`libra_fx.sequence.attention`), and replaces ``model.forward`` by a compiled forward
using :func:`libra_fx.backend`; ``generate`` calls ``self.forward``, so prefill and decode both go
through the backend. Prefill is rewritten; decode steps hold no visual tokens and are compiled as
they are, each layer attending to its own (full or compressed) KV cache. What a decode step needs
from its prefill lives in the model's :class:`~libra_fx.state.ModelState` (``model.libra_backend.state``).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache

from libra_fx import families
from libra_fx.dynamo_backend import LibraBackend
from libra_fx.hf_compat import kv_cache
from libra_fx.methods import is_vision_method
from libra_fx.sequence.attention import use_libra_attention
from libra_fx.state import ModelState


def num_decoder_layers(model) -> int:
    config = getattr(model.config, "text_config", model.config)
    return config.num_hidden_layers


def compile(model, ratio=0.5, layers=(7, 15, 23), method="libra", tau=None, eta=None, strict=False, *,
            compiler="inductor", fullgraph=False):  # noqa: A001  (mirrors torch.compile)
    """Compile ``model.forward`` with the libra backend in place; returns ``model``.

    Raises ``ValueError`` at once for a wrong setting, including a layer index beyond the
    model's decoder. A model of no family in :mod:`libra_fx.families` is compiled uncompressed,
    with a ``LibraFallbackWarning`` naming it (``strict=True``: ``UnsupportedGraph``).
    The backend is ``model.libra_backend`` (its ``records`` say what happened).
    Prompts of new lengths recompile once, then share a graph with a symbolic length
    (Dynamo's automatic dynamic shapes): two prefill and two decode graphs in all.
    ``fullgraph=False`` (the default) lets the vision code of LLaVA-NeXT and Qwen2-VL break the
    graph; the graph that holds the visual tokens and the decoder is compressed. Only the default
    dynamic KV cache is supported (``ValueError`` for a static one).
    """
    family, refused = families.check_model(model, strict)
    be = LibraBackend(ratio, layers, method, tau, eta, strict, compiler=compiler,
                      state=ModelState(family, refused, serves_decode=True))
    model.libra_backend = be
    if family is None:
        model.forward = torch.compile(model.forward, backend=be, fullgraph=fullgraph)
        return model
    be.config.check_layers(num_decoder_layers(model))
    use_libra_attention(model)
    family.install_shims(model)
    compiled = torch.compile(model.forward, backend=be, fullgraph=fullgraph)
    vision_side = is_vision_method(be.config.method)

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        check_cache(kv_cache(kwargs))
        if vision_side:
            kwargs = without_return_dict(kwargs)
        kwargs = be.state.before_call(family.prepare_forward(model, kwargs))
        with torch._dynamo.config.patch(capture_scalar_outputs=True):  # no break at feature-count checks
            out = compiled(*args, **kwargs)
        be.state.after_call(args, kwargs, out)
        return out

    if vision_side:  # keep the vision tower inside the compiled forward under generate()
        forward.__signature__ = signature_for_generate(model.forward)
    model.forward = forward
    return model


def check_cache(cache) -> None:
    """Only a dynamic cache can hold layers of different lengths (full before a stage, shorter after)."""
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"libra_fx: the KV cache {type(cache).__name__} keeps every layer at one length, written by "
            "position, and cannot hold a compressed sequence; use the default dynamic cache (do not pass "
            "cache_implementation='static' or a StaticCache to generate)"
        )


def signature_for_generate(forward) -> inspect.Signature:
    """``forward``'s signature without ``mm_encoder_outputs``.

    transformers ≥ 5.2x ``generate()`` runs the vision tower *before* the first forward (and passes
    ``mm_encoder_outputs``) when forward accepts that argument; the vision-side methods need the
    tower inside the compiled graph, so ``libra_fx.compile`` hides it and ``pixel_values`` reach forward.
    """
    sig = inspect.signature(forward)
    return sig.replace(parameters=[p for name, p in sig.parameters.items() if name != "mm_encoder_outputs"])


def without_return_dict(kwargs: dict) -> dict:
    """generate() passes ``return_dict=True``, the default; with it Dynamo (torch 2.13) cannot trace
    transformers' output-capturing wrapper of ``get_image_features`` ("mapping proxy affected by
    dictionary mutation"), and the vision-side methods need the vision tower traced."""
    return {k: v for k, v in kwargs.items() if not (k == "return_dict" and v is True)}
