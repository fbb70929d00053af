"""Importance α: the last query's attention row at a decoder layer (contract §2, "hybrid attention").

One extra ``1×T`` row is computed beside the layer's own attention kernel, so SDPA / flash
attention stay in place::

    q [B,H,T,d], k [B,Hk,T,d], mask [B|1,1,T,T] | None
        → α [B,T] = mean_h softmax(q[last]·kᵀ·scale + mask[last])   (float32)
"""

from __future__ import annotations

import torch


def mask_allows(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of an attention mask: ``True`` where attending is allowed (bool or additive float)."""
    return mask if mask.dtype == torch.bool else mask == 0


def additive(mask: torch.Tensor) -> torch.Tensor:
    """Float32 additive form of a mask: ``0`` where allowed, ``-inf`` (bool) or its own value (float)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def last_query_index(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Index of each sample's last non-padding token ``[B]``.

    A token is padding iff it may not attend to itself (the mask's diagonal); without a mask
    (pure causal attention), or in a sample that is all padding, it is the last position.
    """
    if mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long)
    diag = mask_allows(mask).diagonal(dim1=-2, dim2=-1)[:, 0].expand(batch, length)
    ranks = torch.arange(length, device=diag.device).expand(batch, length)
    return torch.where(diag, ranks, -1).amax(-1).where(diag.any(-1), length - 1)


def last_row_importance(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """``α[b, j]``: head-averaged attention that sample ``b``'s last token pays token ``j``."""
    b, h, t, d = query.shape
    scale = d**-0.5 if scale is None else scale
    last = last_query_index(mask, b, t).to(query.device)
    q = query.gather(2, last[:, None, None, None].expand(b, h, 1, d)).float()
    k = key.float().repeat_interleave(h // key.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, 1, T]
    if mask is not None:  # a sample that is all padding has no allowed column: its row is left unmasked
        row = mask.expand(b, -1, t, t).gather(2, last[:, None, None, None].expand(b, mask.shape[1], 1, t))
        scores = scores + additive(row).where(mask_allows(row).any(-1, keepdim=True), 0.0)
    return torch.softmax(scores, dim=-1).mean(1)[:, 0]
