"""Batches whose samples hold different visual-token counts ("ragged" batches).

Each sample is compressed by its own counts (SPEC §3), so samples lose different numbers of
tokens; the graph left-pads the shorter ones with *empty slots* that no token attends to
(:func:`libra_fx.layout.compress_visual_tokens`). Prefill masks them itself. Decode steps get one
mask for all layers, as long as layer 0's cache, so the layers after a stage need to know how
many empty slots sit in front of each sample: ``libra_fx.compile``'s forward works that out from
the prompt at prefill, keeps it on the KV cache and passes it to every decode step::

    prefill   input_ids [B, T]  →  cache.libra_empty_slots  [num_layers, B]   (0 before the first stage)
    decode    model(..., libra_empty_slots=…)  →  layer ℓ's mask = full mask shifted right by [ℓ, b]
"""

from __future__ import annotations

import torch

from libra_fx.hf_compat import kv_cache
from libra_fx.methods import visual_token_counts


def visual_runs(input_ids: torch.Tensor, token_ids: set[int]) -> list[list[int]]:
    """Per sample, the lengths of its runs of visual placeholder tokens, in order."""
    rows = []
    for ids in input_ids.tolist():
        row, run = [], 0
        for token in ids + [None]:
            if token in token_ids:
                run += 1
            elif run:
                row, run = row + [run], 0
        rows.append(row)
    return rows


def empty_slots(rows: list[list[int]], ratio: float, layers: tuple[int, ...], method: str, num_layers: int) -> list:
    """``[num_layers][B]``: empty slots in front of each sample in each layer's cache."""
    counts = [[[n, *visual_token_counts(n, ratio, len(layers), method)] for n in row] for row in rows]
    per_layer, total, start = [], [0] * len(rows), 0
    for stage, layer in enumerate(layers):
        removed = [sum(span[stage] - span[stage + 1] for span in spans) for spans in counts]
        per_layer += [list(total)] * (layer + 1 - start)
        total = [t + r - min(removed) for t, r in zip(total, removed)]
        start = layer + 1
    return per_layer + [list(total)] * (num_layers - start)


def placeholder_ids(model) -> set[int]:
    config = model.config
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return {getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)}


def pass_empty_slots(model, config, num_layers: int, kwargs: dict) -> dict:
    """At prefill, work out and keep the empty slots of a ragged batch on its cache; at decode,
    hand them to the attention functions (``libra_empty_slots``). Uniform batches: nothing."""
    cache, ids = kv_cache(kwargs), kwargs.get("input_ids")
    if cache is None or not config.layers:
        return kwargs
    if cache.get_seq_length() == 0:
        cache.libra_empty_slots = None
        if ids is not None and ids.dim() == 2 and ids.shape[0] > 1:
            slots = empty_slots(visual_runs(ids, placeholder_ids(model)), config.ratio, config.layers,
                                config.method, num_layers)
            if any(map(any, slots)):
                cache.libra_empty_slots = torch.tensor(slots, device=ids.device)
        return kwargs
    slots = getattr(cache, "libra_empty_slots", None)
    return kwargs if slots is None else dict(kwargs, libra_empty_slots=slots)
