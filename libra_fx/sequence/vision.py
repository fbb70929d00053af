"""Sequence plumbing of the vision-side methods (:class:`~libra_fx.methods.vision.VisionMethod`): called
from the graph nodes that ``libra_fx/passes/insert_vision_stage.py`` and ``mask_padding_slots.py`` insert.

Two nodes (contract §6). :func:`vision_merge` sits where the method reads the image features (its
signal: the projector's input or output): it turns each image's ``N`` features into ``C`` *slots*
(``C`` = the method's static capacity, ``≤ N``), e.g. PruMerge's merged kept patches in the option's
order, the extra token, then padding; they are written to the first ``C`` rows, so the projector and
the ``masked_scatter`` run unchanged. :func:`vision_compress` sits where the projected features enter
the language model (before decoder layer 0) and cuts each span down to its slots::

    x [S,N,Dv] (the method's features), its signal (e.g. the CLS query and keys)
        → x' [S,N,Dv] (slots first), ranks [S,C], valid [S,C]
    embeds [B,T,D] (projected x' scattered in), span [B,T], ranks, valid
        → embeds' [B,T',D], span' [B,T'], source [B,T'], valid [B,T'], positions [B,T']     T' = T − k·N + k·C

``source`` is the input index whose mask row and column each token takes: itself for text, the
``c``-th token of its span for slot ``c`` (so the mask stays causal in the compressed order).
``positions`` is the input index whose position id and RoPE it takes: the same for text, and with
``positions="original"`` the kept patch's own (the span's last for a slot of no patch: an extra token,
padding); with ``"repacked"`` the token's rank among the non-padding tokens, so the compressed
sequence is numbered afresh. ``valid`` is ``False`` on padding slots only.

Generation: decode steps attend to the prefill's KV cache, which holds the padding slots, but
transformers builds decode masks from the *uncompressed* 2-D ``attention_mask``. The compiled
prefill therefore also returns ``(source, valid, positions)``, from which the runtime around the graph
builds every later step's mask and position ids (:func:`libra_fx.sequence.decode.compressed_prompt_kwargs`).
"""

from __future__ import annotations

import torch

from libra_fx.methods.registry import get_vision_method
from libra_fx.methods.selectors import gather_rows
from libra_fx.methods.vision import VisionInputs
from libra_fx.runtime import compat
from libra_fx.sequence.splice import first_of, splice


def vision_merge(
    features: torch.Tensor,
    query: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    *,
    cls: torch.Tensor | None = None,
    method: str,
    ratio: float,
    slots: int,
    options: tuple = (),
    record: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The method's slots, written over its features → ``(x', ranks, valid)`` (see the module docstring).

    ``features``: ``[S, N, D]``, the features of ``S`` images where the method reads them;
    ``query``/``key``: ``[S, H, T, d]``, the attention inputs of the tower layer its signal names
    (``None`` for a features-only method); ``cls``: ``[S, D]``, the [CLS] token's feature, for a method whose
    signal asks for it. ``options``: the method's as ``((name, value), …)``.
    ``record=True`` (eager runs only) adds a fourth output: the kept patches and each patch's label
    (kept-token maps).
    """
    m = get_vision_method(method)
    opts = m.options(**dict(options))
    n = features.shape[1]
    inputs = VisionInputs(features, query, key, cls)
    out = m.slots(inputs, ratio, slots, opts)
    if out.features.shape != (features.shape[0], slots, features.shape[2]) or out.ranks.shape != out.valid.shape \
            or out.ranks.shape != (features.shape[0], slots):
        raise ValueError(f"{method}: slots must be [S, {slots}, D] with ranks and valid [S, {slots}], got "
                         f"{list(out.features.shape)}, {list(out.ranks.shape)}, {list(out.valid.shape)}")
    if not m.adaptive:
        compat.assert_async(out.valid.all(), f"libra_fx: {method} is not adaptive but left a padding slot")
    merged = out.features
    padded = torch.cat([merged, merged.new_zeros(merged.shape[0], n - slots, merged.shape[2])], 1).to(features.dtype)
    if not record:
        return padded, out.ranks, out.valid
    kept_map = dict(targets=[r[v] for r, v in zip(out.ranks, out.kept)], kept=out.kept.sum(-1),
                    labels=m.labels(inputs, out, opts))
    return padded, out.ranks, out.valid, [kept_map]


def vision_compress(
    hidden: torch.Tensor,
    span: torch.Tensor,
    ranks: torch.Tensor,
    valid: torch.Tensor,
    *,
    span_len: int,
    spans_per_sample: int,
    slots: int,
    positions: str = "original",
) -> tuple[torch.Tensor, ...]:
    """The splice → ``(hidden', span', source, valid, positions)`` (see the module docstring).

    ``hidden``: the embeddings with the projected slots scattered in (each span's first ``slots``
    tokens); ``ranks``/``valid``: :func:`vision_merge`'s, image ``i`` being span ``i % k`` of sample
    ``i // k``.
    """
    b, t, d = hidden.shape
    k, n = spans_per_sample, span_len
    where = first_of(span)[:, : k * n]  # [B, k·N]
    spans = where.reshape(b * k, n)
    compat.assert_async(
        (span.sum(-1) == k * n).all() & (spans[:, -1] - spans[:, 0] == n - 1).all(),
        "libra_fx: a sample does not hold the visual-token spans the graph was compiled for "
        f"({k} contiguous span(s) of {n} tokens)",
    )
    slot_rows = spans[:, :slots]
    features = gather_rows(hidden, slot_rows.reshape(b, k * slots))
    features = torch.where(valid.reshape(b, k * slots, 1), features, 0.0).to(hidden.dtype)  # padding holds zeros
    at = slot_rows.reshape(b, k * slots)
    used = valid.reshape(b, k * slots)
    new_hidden, (is_merged, ok), source = splice(hidden, span, features, 2 * at, at, [(False, used), (True, used)],
                                                 t - k * n + k * slots)
    if positions == "repacked":
        return new_hidden, is_merged, source, ok, (ok.long().cumsum(-1) - 1).clamp_min(0)
    if positions != "original":
        raise ValueError(f"positions must be 'original' or 'repacked', got {positions!r}")
    patch = spans.gather(1, ranks).reshape(b, k * slots)  # a kept patch's own index; the span's last otherwise
    table = torch.arange(t, device=hidden.device).expand(b, t).scatter(1, at, patch)
    return new_hidden, is_merged, source, ok, table.gather(1, source)


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
