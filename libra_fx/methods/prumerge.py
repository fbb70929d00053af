"""PruMerge and PruMerge+ token maths (contract §6, after the public reference
``token_prune_merge_advanced[_plus]`` of 42Shawn/LLaVA-PruMerge), as plain tensor functions.

Batched over images: ``S`` images of ``N`` patches. The vision tower's last layer gives the [CLS]
query and the keys; the features ``x`` are the tower's output, before the projector. The selection
keeps a data-dependent number of patches, which the graph holds in a fixed number ``C`` of *slots*
(kept patches first, then the extra token, then masked padding)::

    query, key [S, H, 1+N, d]  → a = cls_importance(query, key)                  [S, N]   (float32)
    a                          → kept = iqr_outliers(a)                          [S, N]   bool
                                 sampled = uniform_samples(kept)                 (PruMerge+; else none)
    kept | sampled, a          → ranks, is_kept, valid = kept_slots(…, C, order) [S, C]
    x [S, N, D], keys, a       → slots = merged_slots(x, patch_keys(key), a, kept, ranks, is_kept, valid)  [S, C, D]

The methods themselves (their signal, capacity and slots, as :class:`~libra_fx.methods.vision.VisionMethod`
implementations) are :mod:`libra_fx.methods.vision.prumerge`. See docs/methods.md, "PruMerge and
PruMerge+ (vision-side methods)".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from libra_fx.methods.selectors import num_targets, one_hot_targets, top_k
from libra_fx.runtime import compat

NEIGHBOURS = 32  # k of the k-nearest-patch merge
ORDERS = ("spatial", "attention")


def cls_importance(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``a[s, j] = softmax(q_cls·Kᵀ·C^-½)[1 + j]``, float32, over the full width ``C = H·d``.

    ``query``/``key`` are the layer's attention inputs ``[S, H, 1+N, d]``: its ``q_proj``/``k_proj``
    outputs split into heads, so the full-width product is the sum over heads (no per-head softmax).
    The softmax runs over all ``1+N`` keys; the [CLS] key's share is left out, not renormalised.
    """
    if query.dim() != 4 or key.shape != query.shape:
        raise ValueError(f"query and key must both be [S, H, 1+N, d], got {list(query.shape)} and {list(key.shape)}")
    width = query.shape[1] * query.shape[3]
    scores = (full_width(query)[:, :1].float() @ full_width(key).float().transpose(-1, -2)) * width**-0.5
    return torch.softmax(scores, dim=-1)[:, 0, 1:]


def full_width(x: torch.Tensor) -> torch.Tensor:
    """``[S, H, T, d]`` heads back to the projection's output ``[S, T, H·d]``."""
    s, h, t, d = x.shape
    return x.transpose(1, 2).reshape(s, t, h * d)


def patch_keys(key: torch.Tensor) -> torch.Tensor:
    """The patches' key vectors at full width (the layer's ``k_proj`` output, [CLS] left out): ``[S, N, H·d]``."""
    return full_width(key)[:, 1:]


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


def uniform_stride(n: int, k: int) -> int:
    """PruMerge+'s stride when the IQR kept ``k ≥ 1`` of ``n`` patches: ``int(int(1/r)/3)`` with ``r = k/n``,
    read in integers as ``⌊⌊n/k⌋/3⌋`` (``0``: no samples)."""
    return (n // k) // 3


def uniform_samples(kept: torch.Tensor) -> torch.Tensor:
    """PruMerge+: the patches of ``arange(0, N−1, uniform_stride(N, k))`` not already kept (``[S, N]`` bool)."""
    n = kept.shape[-1]
    stride = (n // kept.sum(-1, keepdim=True)) // 3  # [S, 1]; kept.sum ≥ 1
    ranks = torch.arange(n, device=kept.device)
    return (stride > 0) & (ranks < n - 1) & (ranks % stride.clamp_min(1) == 0) & ~kept


def no_samples(kept: torch.Tensor) -> torch.Tensor:
    """The methods without PruMerge+'s supplement."""
    return torch.zeros_like(kept)


def top_fraction(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """The fixed variant: the ``Nt = num_targets(N, ratio)`` most attended patches (lower rank on ties)."""
    return one_hot_targets(top_k(a, num_targets(a.shape[-1], ratio)), a.shape[-1])


def with_extra(n: int, kept: int) -> int:
    """Slots for at most ``kept`` patches of ``n`` plus the extra token, which exists only while a patch
    is pruned: ``min(n, kept + 1)``."""
    return min(n, kept + 1)


def plus_capacity(n: int) -> int:
    """A static bound on PruMerge+'s slots: the largest ``k + |arange(0, n−1, s_k)|`` over the IQR's
    possible ``k`` (1 … ``iqr_capacity(n)``), plus the extra token, at most ``n``."""
    samples = (len(range(0, n - 1, s)) if (s := uniform_stride(n, k)) else 0 for k in range(1, iqr_capacity(n) + 1))
    return with_extra(n, max(k + m for k, m in enumerate(samples, start=1)))


def kept_slots(kept: torch.Tensor, sampled: torch.Tensor, a: torch.Tensor, slots: int,
               order: str = "spatial") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slot layout of each image: ``(ranks, is_kept, valid)``, each ``[S, slots]``.

    Slots hold the kept patches (``kept | sampled``) in ``order``, then the extra token (only when a
    patch is pruned), then padding. ``order="spatial"``: ascending patch rank; ``"attention"``: the
    reference's, ``kept`` by descending ``a`` (lower rank on ties), then ``sampled`` by rank.
    ``ranks`` is each kept slot's patch, ``N − 1`` elsewhere; ``valid`` is ``False`` on padding only.
    Raises (at run time) if an image needs more than ``slots``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    s_img, n = kept.shape
    patches = torch.arange(n, device=kept.device).expand(s_img, n)
    if order == "spatial":
        key = torch.where(kept | sampled, patches, 2 * n + patches)
    else:
        by_a = torch.sort(a, dim=-1, descending=True, stable=True).indices
        rank_by_a = torch.empty_like(by_a).scatter_(1, by_a, patches)
        key = torch.where(kept, rank_by_a, torch.where(sampled, n + patches, 2 * n + patches))
    count = (kept | sampled).sum(-1, keepdim=True)
    compat.assert_async((count + (count < n) <= slots).all(),
                        f"libra_fx: an image kept more patches than its {slots} slots")
    slot = torch.arange(slots, device=kept.device)
    is_kept = slot < count
    ranks = torch.where(is_kept, torch.sort(key, dim=-1, stable=True).indices[:, :slots], n - 1)
    return ranks, is_kept, is_kept | ((slot == count) & (count < n))


def cosine_to(keys: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``cos(k[ranks[s, c]], k[s, j])`` for every slot and patch, ``[S, C, N]``, with the reference's
    ``F.normalize`` (each key divided by ``max(‖k‖, 1e-12)``)."""
    unit = F.normalize(keys.float(), dim=-1)
    return unit.gather(1, ranks[..., None].expand(*ranks.shape, unit.shape[-1])) @ unit.transpose(1, 2)


def neighbours(keys: torch.Tensor, ranks: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """The ``min(k, N−1)`` patches most cosine-similar to each patch of ``ranks`` (itself excluded;
    lower rank on ties): ``[S, C, k]``."""
    n = keys.shape[1]
    sim = cosine_to(keys, ranks).scatter(2, ranks[..., None], float("-inf"))
    return torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., : min(k, n - 1)]


def knn_merge(features: torch.Tensor, keys: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor,
              k: int = NEIGHBOURS) -> torch.Tensor:
    """Each slot's patch ``i`` becomes ``x_i + Σ_{j∈kNN(i)} a_j·x_j`` (unnormalised: the patch keeps weight
    1). ``features [S, N, D]``, ``keys [S, N, Dk]``, ``a [S, N]``, ``ranks [S, C]`` → ``[S, C, D]`` float32."""
    s_img, n = a.shape
    if features.dim() != 3 or features.shape[:2] != (s_img, n) or keys.shape[:2] != (s_img, n) \
            or ranks.dim() != 2 or ranks.shape[0] != s_img:
        raise ValueError(f"knn_merge needs features [S, N, D], keys [S, N, Dk], a [S, N], ranks [S, C]; got "
                         f"{list(features.shape)}, {list(keys.shape)}, {list(a.shape)}, {list(ranks.shape)}")
    x = features.float()
    group = torch.zeros(*ranks.shape, n, dtype=torch.bool, device=x.device).scatter(2, neighbours(keys, ranks, k), True)
    own = x.gather(1, ranks[..., None].expand(*ranks.shape, x.shape[-1]))
    return own + torch.where(group, a[:, None, :].float(), 0.0) @ x


def extra_token(features: torch.Tensor, a: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``Σ_{j pruned} a_j·x_j`` per image (zero when every patch is kept): ``[S, D]`` float32."""
    return (torch.where(kept, 0.0, a.float())[:, None, :] @ features.float())[:, 0]


def merged_slots(features, keys, a, kept, ranks, is_kept, valid, k: int = NEIGHBOURS) -> torch.Tensor:
    """The slots' features ``[S, C, D]`` (float32): merged kept patches, the extra token of the patches
    outside ``kept`` (``[S, N]`` bool, samples included), zeros on padding."""
    extra = extra_token(features, a, kept)[:, None]
    merged = torch.where(is_kept[..., None], knn_merge(features, keys, a, ranks, k), extra)
    return torch.where(valid[..., None], merged, 0.0)


def merge_labels(keys: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """For the kept-token map: each patch's slot ``i`` (a kept patch is its own slot; another patch takes
    the most key-similar kept patch whose group holds it), ``PRUNED`` (-2) when in no group. ``[S, N]``.
    ``valid``: the kept slots."""
    from libra_fx.methods.compressors import PRUNED

    n = keys.shape[1]
    member = torch.zeros(*ranks.shape, n, dtype=torch.bool, device=keys.device)
    member = member.scatter(2, neighbours(keys, ranks, k), True) & valid[..., None]
    best = cosine_to(keys, ranks).masked_fill(~member, float("-inf")).argmax(1)  # [S, N]
    labels = torch.where(member.any(1), best, PRUNED)
    own = torch.arange(ranks.shape[1], device=keys.device).expand_as(ranks)
    slot_of = torch.full((ranks.shape[0], n + 1), -1, device=keys.device)
    slot_of = slot_of.scatter(1, torch.where(valid, ranks, n), own)[:, :n]  # other slots write the spare column
    return torch.where(slot_of >= 0, slot_of, labels)
