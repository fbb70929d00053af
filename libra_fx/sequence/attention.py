"""Attention implementations whose mask may be longer than the layer's own KV cache.

After compression the layers past a stage cache fewer keys than the layers before it, but
transformers builds one decode mask for every layer, as long as layer 0's cache. Left padding
(what ``generate`` uses) stays in front after compression — padding is text, never merged — and
every other past column is visible to the step's queries, so a shorter cache's mask is the
first ``kv_len − q`` columns of that mask followed by its last ``q`` (the step's own, causal)::

    full mask   [B, 1, q, T + n + q]   0 0 1 1 1 1 1 1 1 1 | 1 0 0   (2 pads, prompt T, n cached,
                                       0 0 1 1 1 1 1 1 1 1 | 1 1 0    q = 3 new tokens)
                                       0 0 1 1 1 1 1 1 1 1 | 1 1 1
    layer > L   [B, 1, q, T' + n + q]  0 0 1 1 1 1 | 1 0 0           first T' + n columns, last q
                                       0 0 1 1 1 1 | 1 1 0
                                       0 0 1 1 1 1 | 1 1 1

Where the first full-attention layer comes after a stage (Llama4's follow chunked-attention layers),
transformers builds the full-attention mask from that layer's shorter cache instead: its columns are
that cache's entries, left padding still in front, and the same rule applies.

``libra|sdpa`` (and ``libra|eager|<modeling module>``, ``libra|flash_attention_2``, …) wrap the model's own
function and fit the mask so; everything else is unchanged. They are registered with transformers'
``AttentionInterface`` / ``AttentionMaskInterface`` (:func:`libra_fx.runtime.compat.register_attention`),
one name per wrapped function.
"""

from __future__ import annotations

import torch

from libra_fx.runtime.compat import (attention_function, attn_implementation, is_registered_attention,
                                     is_shared_attention, register_attention)

PREFIX = "libra|"


def fit_mask_to_cache(mask: torch.Tensor | None, key: torch.Tensor, empty: torch.Tensor | None = None, queries: int = 1):
    """Fit a ``[B, h, q, kv]`` (or ``[B, kv]``) mask to a cache of ``key.shape[-2]`` entries: its first
    ``kv − queries`` columns (the past, left padding assumed) and its last ``queries`` (this step's
    tokens). ``empty[b]`` (``[B]``) shifts sample ``b``'s past columns right by that many masked
    columns: the empty slots a batch of unequal visual-token counts put in front (see
    :func:`libra_fx.sequence.splice.compress_visual_tokens`)."""
    kv = key.shape[-2]
    if mask is None or mask.dim() not in (2, 4) or mask.shape[-1] == kv and empty is None:
        return mask  # (a mask as long as the cache may still need shifting: built from a compressed cache, Llama4's)
    past = kv - queries
    column = torch.arange(kv, device=mask.device)
    column = torch.where(column < past, column, column + (mask.shape[-1] - kv))  # [kv]: the step's own at the end
    if empty is None:
        return mask.index_select(-1, column)
    column = torch.where(column < past, column - empty.to(mask.device)[:, None], column)  # [B, kv]
    column = column.reshape(column.shape[0], *[1] * (mask.dim() - 2), kv)
    shifted = mask.gather(-1, column.clamp_min(0).expand(*mask.shape[:-1], kv))
    hidden = torch.zeros((), dtype=mask.dtype) if mask.dtype in (torch.bool, torch.long, torch.int) else \
        torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype)
    return torch.where(column >= 0, shifted, hidden.to(mask.device))


def _wrap(forward):
    def attention(module, query, key, value, attention_mask, *args, libra_empty_slots=None, **kwargs):
        empty = None if libra_empty_slots is None else libra_empty_slots[module.layer_idx]
        mask = fit_mask_to_cache(attention_mask, key, empty, query.shape[-2])
        return forward(module, query, key, value, mask, *args, **kwargs)

    attention.__name__ = f"libra_{getattr(forward, '__name__', 'attention')}"
    return attention


def _decoder_attention(model) -> torch.nn.Module:
    for module in model.get_decoder().modules():
        if module.__class__.__name__.endswith("Attention") and hasattr(module, "layer_idx"):
            return module
    raise ValueError(f"{type(model).__name__}: no decoder attention module (with a layer_idx) found")


def use_libra_attention(model) -> str:
    """Switch ``model``'s language model to a ``libra|…`` attention that wraps the function its own
    attention modules call; returns the implementation it wraps (``"sdpa"``, ``"eager"``, …).

    transformers' attention registry is process-wide, so each wrapped *function* has its own name:
    ``libra|sdpa`` wraps the function transformers registers for every model, ``libra|<name>|<modeling
    module>`` one of a modeling file's own (its ``eager_attention_forward``: Gemma's soft-caps its scores,
    Llama's does not; or a local override in its registry). Two models of two families in one process
    then never call each other's function."""
    text_config = model.config.get_text_config()
    current = attn_implementation(text_config)
    if current.startswith(PREFIX):
        return current.removeprefix(PREFIX).split("|")[0]
    forward = attention_function(_decoder_attention(model), current)
    name = PREFIX + current + ("" if is_shared_attention(current, forward) else f"|{forward.__module__}")
    if not is_registered_attention(name):
        register_attention(name, _wrap(forward), mask_like=current)
    nested = text_config is not model.config  # a VLM: only its language model switches
    model.set_attn_implementation({"text_config": name} if nested else name)
    return current
