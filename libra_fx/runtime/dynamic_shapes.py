"""Which input dimensions Dynamo traces static or symbolic, decided before each compiled call.

- the batch size stays static (:func:`static_batch`): per-sample counts must stay ints;
- a decode step's growing lengths are symbolic from the first step (:func:`growing_lengths_dynamic`);
- for the families whose decoder derives sizes from the prompt length, that length is symbolic from
  the first prompt (:func:`symbolic_length`).
"""

from __future__ import annotations

import torch

from libra_fx.runtime.compat import kv_cache, mark_static, maybe_mark_dynamic, prompt_tokens


def static_batch(args: tuple, kwargs: dict) -> None:
    """Keep the batch size out of Dynamo's automatic dynamic shapes: after a B=1 call, a B=2 call
    would otherwise make every per-sample count (images, features) symbolic, and the passes could
    no longer tell how the features split into images. Each batch size gets its own graph."""
    ids = prompt_tokens(args, kwargs)
    if ids is None:
        return
    for value in (*args[:1], *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == ids.shape[0]:
            mark_static(value, 0)


def growing_lengths_dynamic(kwargs: dict) -> None:
    """Mark a decode step's growing lengths dynamic at once (the KV cache's, the 2-D attention mask's):
    with Dynamo's automatic dynamic shapes the second step would compile the step's graph again."""
    cache = kv_cache(kwargs)
    if cache is None or not cache.get_seq_length():
        return
    for layer in getattr(cache, "layers", ()):
        for kv in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(kv, torch.Tensor) and kv.dim() == 4:
                maybe_mark_dynamic(kv, 2)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        maybe_mark_dynamic(mask, 1)


def symbolic_length(args: tuple, kwargs: dict, token_inputs: tuple[str, ...]) -> str | None:
    """Keep the prompt length symbolic from the first call on (the families whose decoders derive sizes
    from it: ``FamilyAdapter.symbolic_length``); returns the length as Dynamo's ``dynamic_values`` for
    the call (``None``: a decode step, nothing to mark).

    The per-token inputs' length dimension (``token_inputs``: ``input_ids``' dim 1, ``position_ids``'
    last, …) is marked dynamic, and so is every tensor dimension and int of that value that Dynamo meets
    during the call (``dynamic_values``): after a graph break (a vision tower's), the embeddings reach
    the decoder's graph as a new input, which would otherwise be static. Every size the graph derives
    from the length (``E·T`` routing rows, ``T + k − 1`` convolution lengths, chunk padding) is then an
    expression of one symbol, which the passes rewrite for the shorter sequence, and no other dimension
    of the same value (``head_dim``) can be taken for it. Dynamo may still specialise the length (no
    error): such a graph is rewritten as a static one. Other families compile their first prompt with
    static shapes: symbolic shapes cost the passes' shape check about ten times as much, and their
    graphs turn symbolic at the second prompt length anyway.
    """
    ids = prompt_tokens(args, kwargs)
    if ids is None or ids.dim() < 2 or ids.shape[1] < 2:  # nothing to compress in a decode step
        return None
    named = dict(kwargs, input_ids=ids)
    for name in token_inputs:
        value = named.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or name == "attention_mask" and value.dim() != 2:
            continue  # (a 4-D mask of the caller's own is left as it is)
        dim = 1 if name == "inputs_embeds" else value.dim() - 1
        if value.shape[dim] == ids.shape[1]:
            maybe_mark_dynamic(value, dim)
    return str(ids.shape[1])
