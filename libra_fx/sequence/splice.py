"""Sequence plumbing called from the inserted graph nodes: cut the visual spans out of a
sequence, splice their compressed replacement in, and re-index everything that is per-token.

A stage maps a sequence of length ``T`` to one of length ``T' = T − Σ_k (N_k − Nt_k − c)`` (spans
of ``N_k`` tokens per sample, ``c`` = 1 with a compensation token). Every output token has a
*source*: the index, in the stage's input, of the token whose position it takes (contract §5) —
itself for text, ``t_i`` for a merged target, the last span token (or the last carried
compensation token) for a compensation token. RoPE tables, position ids and masks of the later
layers are gathered by that source index::

    hidden [B,T,D], α [B,T], kinds [B,T]
        → hidden' [B,T',D], kinds' [B,T'], source [B,T'] (indices into 0..T−1)

A token's *kind* (``uint8``) is ``TEXT`` (0), ``VISUAL`` (1: a visual token, or an earlier stage's
merged target: what the next stage compresses) or ``COMPENSATION`` (2). A span is one image's visual
tokens in sequence order, contiguous or not: text marker tokens between them (Pixtral's row breaks,
Idefics3's tile markers) are text, and keep their places.
"""

from __future__ import annotations

import functools

import torch

from libra_fx.methods.registry import get_method
from libra_fx.methods.selectors import gather_rows, num_targets
from libra_fx.runtime.compat import assert_async


TEXT, VISUAL, COMPENSATION = 0, 1, 2


def visual_span_mask(placeholder_mask: torch.Tensor) -> torch.Tensor:
    """The ``[B, T]`` bool mask of visual tokens from the model's placeholder mask (``[B, T(, 1)]``)."""
    return placeholder_mask.reshape(placeholder_mask.shape[0], -1).bool()


def first_of(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: per sample, the indices of ``mask``'s tokens first, in sequence order, then the others."""
    return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices


def compress_visual_tokens(
    hidden: torch.Tensor,
    alpha: torch.Tensor,
    kinds: torch.Tensor,
    *,
    span_lens: tuple,
    carried: int,
    method: str,
    ratio: float,
    options: tuple = (),
    record: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One compression stage (contract §3–§5) → ``(hidden', kinds', source)``.

    ``kinds``: each token's kind (the module docstring; a bool mask of the visual tokens before the
    first stage). ``span_lens`` gives, per sample, the lengths of its spans in sequence order — one
    row shared by every sample, or one row per sample. ``carried`` is the number of compensation
    tokens that earlier stages placed after each span (span ``k``'s are compensation tokens
    ``k·carried …``); this stage's goes after them, or after the span's last token. Spans of one
    length are compressed as one batch.

    When samples lose different numbers of tokens, the shorter ones are left-padded with
    *empty slots* (``source = -1``): masked out as keys by :func:`gather_mask`, like padding.
    ``options``: the method's options as ``((name, value), …)``. ``record=True`` (eager runs only)
    adds a fourth output: per span length, the targets and each token's label (kept-token maps).
    """
    m = get_method(method)
    opts = m.options(**dict(options))
    b, t, d = hidden.shape
    c = int(m.compensation)
    shared = len(span_lens) == 1
    rows = span_lens * b if shared else span_lens
    totals = [sum(row) for row in rows]
    kinds = kinds.to(torch.uint8)
    span = kinds == VISUAL
    where = first_of(span)
    comp_where = first_of(kinds == COMPENSATION) if carried else None  # earlier stages' compensation tokens
    flat_hidden, flat_alpha = hidden.reshape(b * t, d), alpha.reshape(b * t)

    counts = span.sum(-1)
    groups, records = [], []
    check = torch.stack([counts[i] == total for i, total in enumerate(totals)])  # (a SymInt-safe tensor)
    for n, units in _units_by_length(rows):
        if shared:  # every sample holds these spans at the same ranks
            index = torch.stack([where[:, s: s + n] for _, s, _ in units[: len(units) // b]], 1).reshape(-1, n)
            last_comp = torch.stack([comp_where[:, (k + 1) * carried - 1: (k + 1) * carried]
                                     for _, _, k in units[: len(units) // b]], 1).reshape(-1, 1) if carried else None
        else:
            index = torch.stack([where[i, s: s + n] for i, s, _ in units])
            last_comp = torch.stack([comp_where[i, (k + 1) * carried - 1: (k + 1) * carried]
                                     for i, _, k in units]) if carried else None
        owner = torch.tensor([i for i, _, _ in units], device=hidden.device)[:, None]
        nt = num_targets(n, ratio)
        tokens, weights = flat_hidden[owner * t + index].float(), flat_alpha[owner * t + index].float()
        targets = m.selector(weights, tokens, nt, opts)
        replaced = m.compressor(tokens, weights, targets, opts).to(hidden.dtype)
        if record:
            records.append(dict(targets=targets, labels=m.labels(tokens, targets, opts), spans=len(units) // b))
        after = (index[:, -1:] if last_comp is None else last_comp)[:, :c]  # the last carried compensation token
        groups.append(dict(units=[i for i, _, _ in units], nt=nt, merged=replaced[:, :nt], comps=replaced[:, nt:],
                           at_target=index.gather(1, targets), after=after))
    assert_async(
        check.all(),
        "libra_fx: a sample does not hold the visual tokens the graph was compiled for "
        f"(spans of {rows[0] if shared else rows} tokens)",
    )
    kept = [sum(g["nt"] + c for g in groups for u in g["units"] if u == i) for i in range(b)]
    removed = [total - k for total, k in zip(totals, kept)]
    fewest = _reduce(min, torch.sym_min, removed)
    if shared:
        extra_hidden, extra_key, extra_source, extra_kinds = _assemble_shared(groups, b)
    else:
        empty = [r - fewest for r in removed]  # samples that lose more tokens get empty slots in front
        extra_hidden, extra_key, extra_source, extra_kinds = _assemble_per_sample(groups, b, d, empty, 4 * t + 4)
    new_hidden, (new_kinds,), source = splice(hidden, span, extra_hidden, extra_key, extra_source,
                                              [(kinds.masked_fill(span, TEXT), extra_kinds)], t - fewest)
    return (new_hidden, new_kinds, source, records) if record else (new_hidden, new_kinds, source)


def splice(hidden, span, new_hidden, new_key, new_source, flags, length):
    """The compressed sequence: ``hidden``'s tokens outside ``span`` and the ``new_*`` tokens, in the
    order of their sort keys, cut to ``length`` → ``(hidden', [flag', …], source)``.

    Keys: ``2·i`` for input token ``i``, and ``4·T + 4`` (cut off) for the span tokens it replaces; a new
    token's ``new_key`` is ``2·i`` to take span token ``i``'s place, ``2·i + 1`` to sit right after
    input token ``i``, negative to come first. ``flags``: ``(value or [B, T] values for the input tokens,
    [B, K] values for the new ones)`` pairs, re-ordered alike.
    """
    b, t, _ = hidden.shape
    ranks = torch.arange(t, device=hidden.device).expand(b, t)
    keys = torch.cat([torch.where(span, 4 * t + 4, 2 * ranks), new_key], dim=1)
    order = torch.sort(keys, dim=-1, stable=True).indices[:, :length]
    flags = [torch.cat([old if isinstance(old, torch.Tensor) else torch.full_like(span, old), new], dim=1).gather(1, order)
             for old, new in flags]
    source = torch.cat([ranks, new_source], dim=1)
    return gather_rows(torch.cat([hidden, new_hidden], dim=1), order), flags, source.gather(1, order)


def _units_by_length(rows) -> list:
    """``[(span length, [(sample, start rank, span number), …]), …]`` in sample order; SymInt lengths
    are told apart by identity (a SymInt is not hashable)."""
    groups: dict = {}
    for i, row in enumerate(rows):
        start = 0
        for k, n in enumerate(row):
            groups.setdefault(n if isinstance(n, int) else id(n), (n, []))[1].append((i, start, k))
            start = start + n
    return list(groups.values())


def _reduce(plain, symbolic, values):
    return plain(values) if all(isinstance(v, int) for v in values) else functools.reduce(symbolic, values)


def _pieces(g):
    """A group's new tokens as (hidden [G, k, D], key [G, k], source [G, k], kind [G, k])."""
    at, after = g["at_target"], g["after"]
    return (torch.cat([g["merged"], g["comps"]], 1), torch.cat([2 * at, 2 * after + 1], 1),
            torch.cat([at, after], 1), torch.cat([torch.full_like(at, VISUAL, dtype=torch.uint8),
                                                  torch.full_like(after, COMPENSATION, dtype=torch.uint8)], 1))


def _assemble_shared(groups, b):
    parts = [_pieces(g) for g in groups]
    return tuple(torch.cat([p[j].reshape(b, -1, *p[j].shape[2:]) for p in parts], 1) for j in range(4))


def _assemble_per_sample(groups, b, d, empty, dropped):
    """Per sample: ``empty[i]`` empty slots (key -1: first), its spans' new tokens, then filler
    (key ``dropped``: cut off) so that every sample has the same number of entries."""
    parts = [_pieces(g) for g in groups]
    per_sample = []
    for i in range(b):
        rows = [torch.tensor([k for k, u in enumerate(g["units"]) if u == i], dtype=torch.long) for g in groups]
        mine = [[p[j][r.to(p[j].device)] for p, r in zip(parts, rows)] for j in range(4)]  # (integer rows: a static shape)
        per_sample.append([torch.cat([x.reshape(-1, *x.shape[2:]) for x in xs]) for xs in mine])
    sizes = [e + x[0].shape[0] for e, x in zip(empty, per_sample)]
    width = _reduce(max, torch.sym_max, sizes)
    out = [[], [], [], []]
    for (h, key, src, kind), e, size in zip(per_sample, empty, sizes):
        fill = width - size
        out[0].append(torch.cat([h.new_zeros(e, d), h, h.new_zeros(fill, d)]))
        out[1].append(torch.cat([key.new_full((e,), -1), key, key.new_full((fill,), dropped)]))
        out[2].append(torch.cat([src.new_full((e,), -1), src, src.new_full((fill,), -1)]))
        out[3].append(torch.cat([kind.new_zeros(e), kind, kind.new_zeros(fill)]))
    return tuple(torch.stack(x) for x in out)
