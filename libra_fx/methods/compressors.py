"""Compressors: what happens to the tokens of a span given its targets (contract §4, §6).

Batched over spans: ``hidden`` ``[S, N, D]`` (float32), ``alpha`` ``[S, N]``, ``targets`` ``[S, Nt]``
ascending ranks. Each returns the span's replacement ``[S, Nt (+1), D]``: the merged targets in
interval order, then (for IGM) the compensation token.
"""

from __future__ import annotations

import torch

from libra_fx.methods.grouped import group_softmax_sum
from libra_fx.methods.selectors import cosine_matrix, gather_rows, one_hot_targets


def assign_groups(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's most similar target ``g(j)`` (first on ties) and that similarity ``s(j)``.

    A target always belongs to its own group. Returns ``(group [S, N], similarity [S, N])``.
    """
    sim = cosine_matrix(gather_rows(hidden, targets), hidden)  # [S, Nt, N]
    best, group = sim.max(dim=1)
    own = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
    group = group.scatter(1, targets, own)
    return group, best


PRUNED, COMPENSATION = -2, -1  # labels of tokens that join no target


def prune_labels(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Label ``i`` for target ``t_i``, ``PRUNED`` for every other token."""
    own = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
    return torch.full(hidden.shape[:2], PRUNED, device=hidden.device).scatter(1, targets, own)


def igm_labels(hidden: torch.Tensor, targets: torch.Tensor, tau: float, merge_positives: bool = True) -> torch.Tensor:
    """IGM membership: the target group of a positive token, ``COMPENSATION`` for a negative one."""
    group, best = assign_groups(hidden, targets)
    is_target = one_hot_targets(targets, hidden.shape[1])
    positive = is_target | (best > tau) if merge_positives else is_target
    return torch.where(positive, group, COMPENSATION)


def _weighted_sum(hidden: torch.Tensor, logits: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """``Σ_j softmax_j(logits over members) · H[j]`` for a member mask ``[S, 1, N]`` (one row: dense is cheapest)."""
    weights = torch.softmax(logits[:, None, :].masked_fill(~member, float("-inf")), dim=-1)
    return weights @ hidden


def prune(hidden: torch.Tensor, alpha: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """FastV: keep the targets, drop the rest."""
    return gather_rows(hidden, targets)


def average(hidden: torch.Tensor, alpha: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Turbo-style merge: every token joins its most similar target; ``m_i`` is the group mean."""
    group, _ = assign_groups(hidden, targets)
    return group_softmax_sum(hidden, torch.zeros_like(alpha), group, targets.shape[1])  # equal weights


def igm(
    hidden: torch.Tensor,
    alpha: torch.Tensor,
    targets: torch.Tensor,
    tau: float = 0.7,
    eta: float | str = "mean",
    compensation: bool = True,
    merge_positives: bool = True,
) -> torch.Tensor:
    """Importance-informed grouped merging (contract §4).

    Positives ``P = {s(j) > τ} ∪ targets`` merge into their group's target with weights
    ``softmax(α/η)`` over the group; the negatives ``Q`` fold into one compensation token.
    ``merge_positives=False`` makes every non-target negative (ablation ``igm_neg``);
    ``compensation=False`` drops the compensation token (ablation ``igm_pos``, with ``τ = −∞``).
    """
    nt = targets.shape[1]
    labels = igm_labels(hidden, targets, tau, merge_positives)
    scale = alpha.mean(-1, keepdim=True) if eta == "mean" else torch.full_like(alpha[:, :1], float(eta))
    logits = alpha / scale.clamp_min(torch.finfo(alpha.dtype).tiny)  # mean(α) = 0: uniform weights (§4)

    merged = group_softmax_sum(hidden, logits, torch.where(labels >= 0, labels, nt), nt)  # negatives: no group
    if not compensation:
        return merged

    negative = labels == COMPENSATION
    non_target = ~one_hot_targets(targets, hidden.shape[1])
    members = torch.where(
        negative.any(-1, keepdim=True),
        negative,
        torch.where(non_target.any(-1, keepdim=True), non_target, torch.ones_like(non_target)),
    )
    comp = _weighted_sum(hidden, logits, members[:, None, :])
    return torch.cat([merged, comp], dim=1)
