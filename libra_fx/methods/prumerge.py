"""PruMerge and PruMerge+ token maths (the PruMerge paper), as plain tensor functions.

Batched over images: ``S`` images of ``N`` patches. The vision tower's last layer gives the
[CLS] query and the keys; the selection keeps a data-dependent number of patches, which the
graph holds in a fixed number of *slots* (kept patches first, then masked padding)::

    query, key [S, H, 1+N, d]  → a = cls_importance(query, key)       [S, N]   (float32)
    a                          → kept = iqr_outliers(a)               [S, N]   bool
                                 kept |= uniform_samples(kept)        (PruMerge+)
    kept                       → ranks, valid = kept_slots(kept, C)   [S, C]   (C = capacity)
    features [S, N, D], keys   → merged = knn_merge(features, patch_keys(key), a, ranks)  [S, C, D]

See the README section "PruMerge and PruMerge+ (vision-side methods)" for the contract.
"""

from __future__ import annotations

import torch

from libra_fx.methods.selectors import cosine_matrix, num_targets, one_hot_targets, top_k

NEIGHBOURS = 32  # k of the k-nearest-patch merge


def cls_importance(query: torch.Tensor, key: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``a[s, j]``: the [CLS] query's attention to patch ``j``, mean over heads, float32.

    ``softmax(q_cls·Kᵀ·scale)`` over all ``1+N`` keys ([CLS] included, as the layer itself
    attends), then restricted to the ``N`` patches, not renormalised. ``scale`` defaults to ``d^-½``.
    """
    if query.dim() != 4 or key.shape != query.shape:
        raise ValueError(f"query and key must both be [S, H, 1+N, d], got {list(query.shape)} and {list(key.shape)}")
    d = query.shape[-1]
    scale = d**-0.5 if scale is None else scale
    scores = (query[:, :, :1].float() @ key.float().transpose(-1, -2)) * scale  # [S, H, 1, 1+N]
    return torch.softmax(scores, dim=-1).mean(1)[:, 0, 1:]


def patch_keys(key: torch.Tensor) -> torch.Tensor:
    """The patches' key vectors, all heads concatenated (the layer's ``k_proj`` output): ``[S, N, H·d]``."""
    s, h, t, d = key.shape
    return key.transpose(1, 2).reshape(s, t, h * d)[:, 1:]


def quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(a, q, dim=-1)`` with linear interpolation (NumPy's default), ``[S]``."""
    return torch.quantile(a, q, dim=-1, interpolation="linear")


def iqr_outliers(a: torch.Tensor) -> torch.Tensor:
    """Patches with ``a > Q3 + 1.5·(Q3 − Q1)``, per image (``[S, N]`` bool).

    An image with no such patch keeps its most attended one (the first on ties), so every image
    keeps at least one token.
    """
    if a.dim() != 2 or a.shape[-1] < 1:
        raise ValueError(f"importance must be [S, N] with N ≥ 1, got {list(a.shape)}")
    q1, q3 = quantile(a, 0.25), quantile(a, 0.75)
    kept = a > (q3 + 1.5 * (q3 - q1))[:, None]
    top = torch.zeros_like(kept).scatter(1, a.argmax(-1, keepdim=True), True)
    return torch.where(kept.any(-1, keepdim=True), kept, top)


def iqr_capacity(n: int) -> int:
    """An upper bound on how many of ``n`` values lie strictly above their linear-interpolation Q3.

    Q3 sits at sorted position ``p = 0.75·(n−1)`` and is ``≥`` the value at ``floor(p)``, so only
    the ``n − 1 − floor(p)`` values after it can exceed it (at least 1: the fallback keeps one).
    """
    if n < 1:
        raise ValueError(f"an image needs at least one patch, got {n}")
    return max(1, n - 1 - (3 * (n - 1)) // 4)


def uniform_target(n: int) -> int:
    """The PruMerge+ total: about 25 % of the patches, ``clamp(round(n/4), 1, n)``."""
    return num_targets(n, 0.75)


def uniform_stride(n: int, k: int) -> int:
    """Stride of the uniform samples when IQR kept ``k`` of ``n`` patches (``0``: no samples).

    ``M = uniform_target(n)``; if ``k < M`` the stride is ``ceil(n / (M − k))``: the smallest stride
    whose ``ceil(n / stride)`` samples number at most ``M − k``, so the total is at most ``M`` and
    close to it (less where samples fall on IQR patches).
    """
    m = uniform_target(n)
    return 0 if k >= m else -(-n // (m - k))


def uniform_samples(kept: torch.Tensor) -> torch.Tensor:
    """PruMerge+: add the patches ``0, s, 2s, …`` (row-major) with ``s = uniform_stride(N, k)`` per image."""
    s_img, n = kept.shape
    k = kept.sum(-1)  # [S]
    m = uniform_target(n)
    missing = torch.clamp_min(m - k, 1)
    stride = torch.where(k < m, (n + missing - 1) // missing, torch.zeros_like(k))  # ceil(n / (M − k))
    ranks = torch.arange(n, device=kept.device).expand(s_img, n)
    sampled = (stride[:, None] > 0) & (ranks % torch.clamp_min(stride, 1)[:, None] == 0)
    return kept | sampled


def plus_capacity(n: int) -> int:
    """An upper bound on the PruMerge+ count: ``max(uniform_target(n), iqr_capacity(n))`` (the samples
    never take the total past ``M``; IQR alone may keep up to its own capacity)."""
    return max(uniform_target(n), iqr_capacity(n))


def top_fraction(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """The fixed variant: the ``Nt = num_targets(N, ratio)`` most attended patches (lower rank on ties)."""
    return one_hot_targets(top_k(a, num_targets(a.shape[-1], ratio)), a.shape[-1])


def kept_slots(kept: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept ranks in original order, padded to ``slots``: ``(ranks [S, slots], valid [S, slots])``.

    Padding slots repeat the last patch rank ``N − 1`` (any valid index) and are ``valid=False``.
    Raises (at run time) if an image keeps more than ``slots`` patches.
    """
    s_img, n = kept.shape
    count = kept.sum(-1)
    torch._assert_async((count <= slots).all(), f"libra_fx: an image kept more patches than its {slots} slots")
    ranks = torch.arange(n, device=kept.device).expand(s_img, n)
    order = torch.sort(torch.where(kept, ranks, n + ranks), dim=-1, stable=True).values[:, :slots]
    valid = order < n
    return torch.where(valid, order, n - 1), valid


def neighbours(keys: torch.Tensor, ranks: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """The ``min(k, N−1)`` patches most cosine-similar to each patch of ``ranks`` (itself excluded;
    lower rank on ties): ``[S, C, k]``."""
    n = keys.shape[1]
    sim = _slot_similarity(keys, ranks).scatter(2, ranks[..., None], float("-inf"))
    return torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., : min(k, n - 1)]


def _slot_similarity(keys: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``cos(k[ranks[s, c]], k[s, j])`` for every slot and patch: ``[S, C, N]``."""
    return cosine_matrix(keys.gather(1, ranks[..., None].expand(*ranks.shape, keys.shape[-1])), keys)


def knn_merge(features: torch.Tensor, keys: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor,
              k: int = NEIGHBOURS) -> torch.Tensor:
    """Each slot's patch becomes ``Σ_j w_j·F[j]`` over itself and its ``k`` nearest patches (key cosine),
    ``w = a / Σ a`` over that group. ``features [S, N, D]``, ``keys [S, N, Dk]``, ``a [S, N]``,
    ``ranks [S, C]`` → ``[S, C, D]`` (float32)."""
    s_img, n = a.shape
    if features.dim() != 3 or features.shape[:2] != (s_img, n) or keys.shape[:2] != (s_img, n) \
            or ranks.dim() != 2 or ranks.shape[0] != s_img:
        raise ValueError(f"knn_merge needs features [S, N, D], keys [S, N, Dk], a [S, N], ranks [S, C]; got "
                         f"{list(features.shape)}, {list(keys.shape)}, {list(a.shape)}, {list(ranks.shape)}")
    group = torch.zeros(*ranks.shape, features.shape[1], dtype=torch.bool, device=features.device)
    group = group.scatter(2, ranks[..., None], True).scatter(2, neighbours(keys.float(), ranks, k), True)
    w = torch.where(group, a[:, None, :].float(), 0.0)
    return (w / w.sum(-1, keepdim=True)) @ features.float()


def merge_labels(keys: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """For the kept-token map: each patch's slot ``i`` (a kept patch is its own slot; another patch takes
    the most key-similar kept patch whose group holds it), ``PRUNED`` (-2) when in no group. ``[S, N]``."""
    from libra_fx.methods.compressors import PRUNED

    n = keys.shape[1]
    member = torch.zeros(*ranks.shape, n, dtype=torch.bool, device=keys.device)
    member = member.scatter(2, neighbours(keys.float(), ranks, k), True) & valid[..., None]
    best = _slot_similarity(keys.float(), ranks).masked_fill(~member, float("-inf")).argmax(1)  # [S, N]
    labels = torch.where(member.any(1), best, PRUNED)
    own = torch.arange(ranks.shape[1], device=keys.device).expand_as(ranks)
    slot_of = torch.full((ranks.shape[0], n + 1), -1, device=keys.device)
    slot_of = slot_of.scatter(1, torch.where(valid, ranks, n), own)[:, :n]  # padding writes the spare column
    return torch.where(slot_of >= 0, slot_of, labels)
