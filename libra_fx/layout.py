"""Sequence plumbing called from the inserted graph nodes: cut the visual spans out of a
sequence, splice their compressed replacement in, and re-index everything that is per-token.

A stage maps a sequence of length ``T`` to one of length ``T' = T − k·N + k·(Nt + c)`` (``k``
spans of ``N`` tokens per sample, ``c`` = 1 with a compensation token). Every output token has a
*source*: the index, in the stage's input, of the token whose position it takes (SPEC §5) —
itself for text, ``t_i`` for a merged target, the last span token (or the last carried
compensation token) for a compensation token. RoPE tables, position ids and masks of the later
layers are gathered by that source index::

    hidden [B,T,D], α [B,T], span [B,T]
        → hidden' [B,T',D], span' [B,T'] (merged targets), source [B,T'] (indices into 0..T−1)
"""

from __future__ import annotations

import contextlib

import torch

from libra_fx.methods import get_method
from libra_fx.selectors import gather_rows, num_targets


RECORDINGS: list[list[dict]] = []  # filled by eager runs inside ``recording()``


@contextlib.contextmanager
def recording():
    """Collect each stage's targets and token labels (eagerly run graphs only, e.g. ``compiler="eager"``)."""
    RECORDINGS.append([])
    try:
        yield RECORDINGS[-1]
    finally:
        RECORDINGS.pop()


def visual_span_mask(placeholder_mask: torch.Tensor) -> torch.Tensor:
    """The ``[B, T]`` bool mask of visual tokens from the model's placeholder mask (``[B, T(, 1)]``)."""
    return placeholder_mask.reshape(placeholder_mask.shape[0], -1).bool()


def compress_visual_tokens(
    hidden: torch.Tensor,
    alpha: torch.Tensor,
    span: torch.Tensor,
    *,
    span_len: int,
    spans_per_sample: int,
    carried: int,
    method: str,
    ratio: float,
    tau: float,
    eta: float | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One compression stage (SPEC §3–§5) → ``(hidden', span', source)``.

    ``span`` marks the ``spans_per_sample × span_len`` compressible tokens of each sample (the
    previous stage's merged targets; its compensation tokens are not part of it). ``carried`` is
    the number of compensation tokens that earlier stages placed right after each span.
    """
    m = get_method(method)
    b, t, d = hidden.shape
    k, n = spans_per_sample, span_len
    nt = num_targets(n, ratio)
    c = int(m.compensation)
    where = torch.sort((~span).to(torch.uint8), dim=-1, stable=True).indices[:, : k * n]  # [B, k·N]
    spans = where.reshape(b * k, n)
    torch._assert_async(
        (span.sum(-1) == k * n).all() & (spans[:, -1] - spans[:, 0] == n - 1).all(),
        "libra_fx: a sample does not hold the visual-token spans the graph was compiled for "
        f"({k} contiguous span(s) of {n} tokens)",
    )
    tokens = gather_rows(hidden.float(), where).reshape(b * k, n, d)
    weights = alpha.gather(1, where).reshape(b * k, n).float()
    targets = m.selector(weights, tokens, nt)
    replaced = m.compressor(tokens, weights, targets, tau=tau, eta=eta).to(hidden.dtype)
    if RECORDINGS and not torch.compiler.is_compiling():
        RECORDINGS[-1].append(dict(targets=targets, labels=m.labels(tokens, targets, tau), spans=k))

    at_target = spans.gather(1, targets).reshape(b, k * nt)  # input index each merged token sits at
    after_span = (spans[:, -1:] + carried)[:, :c].reshape(b, k * c)  # last carried comp token (or span end)
    ranks = torch.arange(t, device=hidden.device).expand(b, t)
    dropped = torch.full_like(ranks, 4 * t + 4)
    keys = torch.cat([torch.where(span, dropped, 2 * ranks), 2 * at_target, 2 * after_span + 1], dim=1)
    order = torch.sort(keys, dim=-1, stable=True).indices[:, : t - k * n + k * (nt + c)]

    pool = torch.cat(
        [hidden, replaced[:, :nt].reshape(b, k * nt, d), replaced[:, nt:].reshape(b, k * c, d)], dim=1
    )
    is_merged = torch.cat([torch.zeros_like(span), torch.ones_like(at_target, dtype=torch.bool),
                           torch.zeros_like(after_span, dtype=torch.bool)], dim=1)
    source = torch.cat([ranks, at_target, after_span], dim=1)
    return gather_rows(pool, order), is_merged.gather(1, order), source.gather(1, order)


def gather_tokens(x: torch.Tensor, source: torch.Tensor, dim: int) -> torch.Tensor:
    """Re-index a per-token tensor (RoPE cos/sin, position ids) along ``dim`` by ``source [B, T']``.

    ``x`` has a leading batch dimension of 1 or ``B``.
    """
    b, t_new = source.shape
    x = x.expand(b, *x.shape[1:])
    shape = [b] + [1] * (x.dim() - 1)
    shape[dim] = t_new
    index = source.reshape(shape).expand(*[t_new if i == dim else s for i, s in enumerate(x.shape)])
    return x.gather(dim, index)


def gather_mask(mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Re-index a ``[B|1, h, T, T]`` attention mask to ``[B, h, T', T']``, causal in the new order.

    Bool masks stay bool; additive float masks keep their dtype and use its minimum for
    the newly forbidden entries.
    """
    rows = gather_tokens(mask, source, 2)
    both = gather_tokens(rows, source, 3)
    t_new = source.shape[1]
    causal = torch.ones(t_new, t_new, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return both & causal
    return both.masked_fill(~causal, torch.finfo(mask.dtype).min)
