"""Sequence plumbing of the vision-side methods (PruMerge, PruMerge+, fixed): called from the graph
nodes that ``libra_fx/passes/insert_vision_stage.py`` and ``mask_padding_slots.py`` insert.

The stage sits where the image features enter the language model (before decoder layer 0). Each
image span of ``N`` tokens becomes ``C`` *slots* (``C`` = the method's static capacity): the kept
patches, merged, in original order, then padding slots that no other token may attend to::

    embeds [B,T,D] (features scattered in), span [B,T], CLS query/keys of the tower's last layer
        → embeds' [B,T',D], span' [B,T'], source [B,T'], valid [B,T']     T' = T − k·N + k·C

``source`` is the input index whose position id (and RoPE, mask row/column) each token takes: itself
for text, the patch for a kept patch, the span's last token for padding. ``valid`` is ``False``
on padding slots only.

Generation: decode steps attend to the prefill's KV cache, which holds the padding slots, but
transformers builds decode masks from the *uncompressed* 2-D ``attention_mask``. The compiled
prefill therefore also returns ``(source, valid)``, from which :mod:`libra_fx.state` builds every
later step's mask (:func:`libra_fx.sequence.decode.compressed_prompt_kwargs`).
"""

from __future__ import annotations

import torch

from libra_fx.methods import prumerge
from libra_fx.methods.registry import get_method
from libra_fx.methods.selectors import gather_rows
from libra_fx.sequence.splice import splice


def vision_compress(
    hidden: torch.Tensor,
    span: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float | None,
    *,
    span_len: int,
    spans_per_sample: int,
    method: str,
    ratio: float,
    slots: int,
    neighbours: int = prumerge.NEIGHBOURS,
    record: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The PruMerge stage → ``(hidden', span', source, valid)`` (see the module docstring).

    ``query``/``key``: ``[B·k, H, 1+N, d]``, the last vision layer's attention inputs, image ``i``
    being span ``i % k`` of sample ``i // k``. ``record=True`` (eager runs only) adds a fifth
    output: the kept patches and each patch's label (kept-token maps).
    """
    b, t, d = hidden.shape
    k, n = spans_per_sample, span_len
    where = torch.sort((~span).to(torch.uint8), dim=-1, stable=True).indices[:, : k * n]  # [B, k·N]
    spans = where.reshape(b * k, n)
    torch._assert_async(
        (span.sum(-1) == k * n).all() & (spans[:, -1] - spans[:, 0] == n - 1).all(),
        "libra_fx: a sample does not hold the visual-token spans the graph was compiled for "
        f"({k} contiguous span(s) of {n} tokens)",
    )
    features = gather_rows(hidden, where).reshape(b * k, n, d)
    a = prumerge.cls_importance(query, key, scale)
    keys = prumerge.patch_keys(key)
    kept = get_method(method).select(a, ratio)
    ranks, ok = prumerge.kept_slots(kept, slots)
    merged = prumerge.knn_merge(features, keys, a, ranks, neighbours)
    merged = torch.where(ok[..., None], merged, 0.0).to(hidden.dtype)  # padding slots hold zeros

    at = spans.gather(1, ranks)  # input index each slot takes its position from
    at = torch.where(ok, at, spans[:, -1:]).reshape(b, k * slots)
    used = ok.reshape(b, k * slots)
    new_hidden, (is_merged, valid), source = splice(
        hidden, span, merged.reshape(b, k * slots, d), 2 * at + (~used).long(), at, [(False, used), (True, used)],
        t - k * n + k * slots)
    if not record:
        return new_hidden, is_merged, source, valid
    kept_map = dict(targets=[r[v] for r, v in zip(ranks, ok)], labels=prumerge.merge_labels(keys, ranks, ok, neighbours),
                  spans=k, kept=ok.sum(-1))
    return new_hidden, is_merged, source, valid, [kept_map]


def mask_padding_slots(mask: torch.Tensor | None, valid: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """A decoder attention mask in which no token attends to a padding slot (but each slot to itself).

    ``mask``: the layer's ``[B|1, h, T', T']`` mask (bool, or additive float), or ``None`` for plain
    causal attention (then a bool mask, or a float32 additive one with ``additive=True``).
    """
    b, t = valid.shape
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)
    keys_ok = valid[:, None, None, :] | eye  # [B, 1, T', T']
    if mask is None:
        allowed = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril() & keys_ok
        if not additive:
            return allowed
        return torch.zeros(allowed.shape, device=valid.device).masked_fill(~allowed, float("-inf"))
    if mask.dtype == torch.bool:
        return mask & keys_ok
    return mask.masked_fill(~keys_ok, torch.finfo(mask.dtype).min)
