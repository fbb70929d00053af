"""Attention implementations whose mask may be longer than the layer's own KV cache.

After compression the layers past a stage cache fewer keys than the layers before it, but
transformers builds one decode mask for every layer, as long as layer 0's cache. Left padding
(what ``generate`` uses) stays in front after compression — padding is text, never merged — so
the mask of a shorter cache is the first ``kv_len`` columns of that mask::

    full mask   [B, 1, 1, T + n]   0 0 1 1 1 1 1 1 1 1 1     (2 pads, prompt T, n new tokens)
    layer > L   [B, 1, 1, T' + n]  0 0 1 1 1 1 1             first T' + n columns

``libra|sdpa`` (and ``libra|eager``, ``libra|flash_attention_2``, …) wrap the model's own function and
take those columns; everything else is unchanged. They are registered with transformers'
``AttentionInterface`` / ``AttentionMaskInterface`` (public extension points, no patching).
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

PREFIX = "libra|"


def fit_mask_to_cache(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """The first ``key.shape[-2]`` columns of a ``[B, h, q, kv]`` mask (left padding assumed)."""
    if mask is None or mask.dim() != 4 or mask.shape[-1] == key.shape[-2]:
        return mask
    return mask[..., : key.shape[-2]]


def _wrap(forward):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        return forward(module, query, key, value, fit_mask_to_cache(attention_mask, key), *args, **kwargs)

    attention.__name__ = f"libra_{getattr(forward, '__name__', 'attention')}"
    return attention


def _model_eager_attention(model) -> object:
    for module in model.modules():
        if module.__class__.__name__.endswith("Attention") and hasattr(module, "layer_idx"):
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is not None:
                return fn
    raise ValueError(f"{type(model).__name__}: no decoder attention with an eager_attention_forward found")


def use_libra_attention(model) -> str:
    """Switch ``model`` to the ``libra|<its implementation>`` attention; returns the new name."""
    nested = hasattr(model.config, "text_config")  # a VLM: only its language model switches
    base = (model.config.text_config if nested else model.config)._attn_implementation
    if base.startswith(PREFIX):
        return base
    name = PREFIX + base
    forward = _model_eager_attention(model) if base == "eager" else AttentionInterface._global_mapping[base]
    AttentionInterface.register(name, _wrap(forward))
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    model.set_attn_implementation({"text_config": name} if nested else name)
    return name
