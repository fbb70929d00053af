"""Sequence plumbing of the vision-side methods (PruMerge, PruMerge+, fixed): called from the graph
nodes that ``passes/insert_prumerge.py`` inserts, and from ``libra_fx.compile``'s forward.

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
prefill therefore also returns ``(source, valid)`` (see ``LibraBackend``); :func:`call_compiled`
remembers the compressed layout of the returned cache and hands every later step on that cache a
2-D mask of the compressed layout (and position ids continuing the original prompt when transformers
does not pass them).
"""

from __future__ import annotations

import inspect
import weakref

import torch

from libra_fx import prumerge
from libra_fx.hf_compat import kv_cache, returned_cache
from libra_fx.layout import RECORDINGS, splice
from libra_fx.selectors import gather_rows


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PruMerge stage → ``(hidden', span', source, valid)`` (see the module docstring).

    ``query``/``key``: ``[B·k, H, 1+N, d]``, the last vision layer's attention inputs, image ``i``
    being span ``i % k`` of sample ``i // k``.
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
    kept = prumerge.select(method, a, ratio)
    ranks, ok = prumerge.kept_slots(kept, slots)
    merged = prumerge.knn_merge(features, keys, a, ranks, neighbours)
    merged = torch.where(ok[..., None], merged, 0.0).to(hidden.dtype)  # padding slots hold zeros
    if RECORDINGS and not torch.compiler.is_compiling():
        labels = prumerge.merge_labels(keys, ranks, ok, neighbours)
        RECORDINGS[-1].append(dict(targets=[r[v] for r, v in zip(ranks, ok)], labels=labels, spans=k,
                                   kept=ok.sum(-1)))

    at = spans.gather(1, ranks)  # input index each slot takes its position from
    at = torch.where(ok, at, spans[:, -1:]).reshape(b, k * slots)
    ok = ok.reshape(b, k * slots)
    new_hidden, (is_merged, valid), source = splice(
        hidden, span, merged.reshape(b, k * slots, d), 2 * at + (~ok).long(), at, [(False, ok), (True, ok)],
        t - k * n + k * slots)
    return new_hidden, is_merged, source, valid


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


# --------------------------------------------------------------------------------------------
# Generation: the compressed layout of a KV cache, for the decode steps that read it
# --------------------------------------------------------------------------------------------

_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache → (prompt length, keep [B, T'])


def signature_for_generate(forward) -> inspect.Signature:
    """``forward``'s signature without ``mm_encoder_outputs``.

    transformers ≥ 5.2x ``generate()`` runs the vision tower *before* the first forward (and passes
    ``mm_encoder_outputs``) when forward accepts that argument; the vision-side methods need the
    tower inside the compiled graph, so ``libra_fx.compile`` hides it and ``pixel_values`` reach forward.
    """
    sig = inspect.signature(forward)
    return sig.replace(parameters=[p for name, p in sig.parameters.items() if name != "mm_encoder_outputs"])


def _prompt_length(args, kwargs) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs["inputs_embeds"]
    return ids.shape[1]


def _decode_kwargs(kwargs: dict, prompt_len: int, keep: torch.Tensor, cache) -> dict:
    """The 2-D mask (and, when absent, position ids) of a step on a cache that holds a compressed prompt."""
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    q = ids.shape[1]
    cached = cache.get_seq_length()
    new = cached - keep.shape[1]  # tokens generated after the prompt and already cached
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("libra_fx: decoding on a PruMerge-compressed cache needs a 2-D attention_mask")
    tail = mask[:, prompt_len:] if mask is not None else keep.new_ones(keep.shape[0], new + q)
    if tail.shape[1] != new + q:
        raise ValueError(
            f"libra_fx: the attention_mask ({mask.shape[1]} columns) does not continue the compressed prompt "
            f"({prompt_len} tokens, {new} generated since, {q} new)"
        )
    out = dict(kwargs)
    out["attention_mask"] = torch.cat([keep.to(tail.dtype), tail], dim=1)
    if kwargs.get("position_ids") is None:
        if mask is not None:
            out["position_ids"] = mask.long().cumsum(-1)[:, -q:] - 1
        else:
            out["position_ids"] = torch.arange(prompt_len + new, prompt_len + new + q, device=keep.device)[None]
    return out


def call_compiled(compiled, backend, args: tuple, kwargs: dict):
    """Run the compiled forward; remember the compressed layout of a prefill, apply it on later steps."""
    if kwargs.get("return_dict") is True:
        # generate() passes return_dict=True, the default; with it Dynamo (torch 2.13) cannot trace
        # transformers' output-capturing wrapper of get_image_features ("mapping proxy affected by
        # dictionary mutation"), and the vision tower must be traced here
        kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
    cache = kv_cache(kwargs)
    layout = _LAYOUTS.get(cache) if cache is not None else None
    if layout is not None and cache.get_seq_length() > 0:
        kwargs = _decode_kwargs(kwargs, *layout, cache)
    backend.side_outputs = None
    out = compiled(*args, **kwargs)
    side, backend.side_outputs = backend.side_outputs, None
    returned = returned_cache(out)
    if side is not None and returned is not None:
        source, valid = side
        mask = kwargs.get("attention_mask")
        keep = valid if mask is None else valid & mask.bool().gather(1, source)
        _LAYOUTS[returned] = (_prompt_length(args, kwargs), keep)
    return out
