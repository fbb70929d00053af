"""Selectors: which tokens of a span become targets (contract §3, §6).

All functions are batched over spans: ``alpha`` is ``[S, N]`` (importance of the ``N`` tokens of
``S`` spans), ``hidden`` is ``[S, N, D]``. They return target ranks ``[S, Nt]``, ascending.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def per_stage(ratio, stages: int) -> tuple:
    """``ratio`` as one ratio per stage: a tuple of ``stages`` ratios as given, or one ratio repeated
    (``ValueError`` for a tuple of another length)."""
    ratios = tuple(ratio) if isinstance(ratio, (tuple, list)) else (ratio,) * stages
    if len(ratios) != stages:
        raise ValueError(f"{len(ratios)} ratios for {stages} stages")
    return ratios


def num_targets(n, ratio: float):
    """``Nt = clamp(round(N·(1−R)), 1, N)``; ``round`` is half-up (``2.5 → 3``).

    ``R`` is read as the decimal it prints as, so ``15·(1−0.9)`` is exactly 1.5 (→ 2), not the
    binary float ``1.4999999999999996``. ``n`` may be a SymInt (images of any size): the result
    is then a SymInt too, computed in integers as ``floor((2·N·p + q) / 2q)`` for ``1 − R = p/q``.
    """
    keep = 1 - Fraction(repr(float(ratio)))
    kept = (2 * n * keep.numerator + keep.denominator) // (2 * keep.denominator)
    if isinstance(n, int):
        return min(max(kept, 1), n)
    if 2 * keep >= 1:  # R ≤ 0.5: kept ≥ 1 for every n ≥ 1 (and 0 for n = 0, as above), so no clamp to write
        return kept
    # kept ≤ n always (p ≤ q), so only the lower clamp is written: each stage nests one Max, not a
    # Min of a Max, in the next stage's length (sympy's view/reshape checks slow down with nesting)
    return torch.sym_max(kept, 1)


def pti(alpha: torch.Tensor, nt: int) -> torch.Tensor:
    """Position-driven token identification: the most important rank of each of ``nt`` intervals.

    Interval ``i`` covers ranks ``floor(i·N/nt) .. floor((i+1)·N/nt) − 1``; ties go to the first rank.
    """
    s, n = alpha.shape
    i = torch.arange(nt, device=alpha.device)
    start = i * n // nt
    end = (i + 1) * n // nt
    width = -(-n // nt)
    ranks = start[:, None] + torch.arange(width, device=alpha.device)  # [nt, width]
    inside = ranks < end[:, None]
    ranks = torch.where(inside, ranks, start[:, None])
    scores = alpha[:, ranks.reshape(-1)].reshape(s, nt, width)
    scores = scores.masked_fill(~inside, float("-inf"))
    return ranks.gather(1, scores.argmax(-1).T).T  # argmax keeps the first maximum


def top_k(score: torch.Tensor, nt: int) -> torch.Tensor:
    """The ``nt`` highest scores, returned in span order; on ties the lower rank wins."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return order[:, :nt].sort(dim=-1).values


def top_alpha(alpha: torch.Tensor, nt: int) -> torch.Tensor:
    """FastV / ``merge`` selector: top-``nt`` by importance."""
    return top_k(alpha, nt)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cos(a_i, b_j) = a_i·b_j / max(‖a_i‖·‖b_j‖, 1e-8)`` for ``a: [S, I, D]``, ``b: [S, J, D]``."""
    norms = a.norm(dim=-1)[:, :, None] * b.norm(dim=-1)[:, None, :]
    return (a @ b.transpose(1, 2)) / norms.clamp_min(1e-8)


def turbo(alpha: torch.Tensor, hidden: torch.Tensor, nt: int, lam: float = 1.0) -> torch.Tensor:
    """Turbo informativity ``I_j = α_j / mean(α) − λ·max_{k≠j} cos(H_j, H_k)``, top-``nt``."""
    sim = cosine_matrix(hidden, hidden)
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    redundancy = sim.masked_fill(eye, float("-inf")).amax(-1)
    if sim.shape[-1] == 1:
        redundancy = torch.zeros_like(alpha)
    info = alpha / alpha.mean(-1, keepdim=True) - lam * redundancy
    return top_k(info, nt)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[s, index[s, i], :]`` for ``x: [S, N, D]``, ``index: [S, I]`` → ``[S, I, D]``."""
    return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))


def one_hot_targets(targets: torch.Tensor, n: int) -> torch.Tensor:
    """``[S, Nt]`` ranks → ``[S, N]`` bool mask of the targets."""
    mask = torch.zeros(targets.shape[0], n, dtype=torch.bool, device=targets.device)
    return mask.scatter(1, targets, True)  # (one_hot would specialise a symbolic ``n``)
