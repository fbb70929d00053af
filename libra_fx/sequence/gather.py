"""Re-index per-token tensors and attention masks by a stage's source index (contract §5).

::

    cos [B|1, T, d], source [B, T']            → gather_tokens(cos, source, 1)   [B, T', d]
    mask [B|1, h, T, T], source [B, T']        → gather_mask(mask, source)       [B, h, T', T']
"""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, source: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Re-index a per-token tensor (RoPE cos/sin, position ids) along ``dim`` by ``source [B, T']``.

    ``x`` has a batch dimension of size 1 or ``B`` at ``batch_dim`` (``< dim``): 0 for ``[B, T, d]``
    tables, 1 for multi-axis RoPE's ``[R, B, T, d]``.
    """
    b, t_new = source.shape
    source = source.clamp_min(0)  # empty slots (-1) read token 0; gather_mask hides them
    x = x.movedim(batch_dim, 0)
    x = x.expand(b, *x.shape[1:])
    shape = [b] + [1] * (x.dim() - 1)
    shape[dim] = t_new
    index = source.reshape(shape).expand(*[t_new if i == dim else s for i, s in enumerate(x.shape)])
    return x.gather(dim, index).movedim(0, batch_dim)


def gather_mask(mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Re-index a ``[B|1, h, T, T]`` attention mask to ``[B, h, T', T']`` (contract §5).

    Kept tokens ``q, k`` get ``M[source q, source k]``: the original mask's rows and columns at their
    sources, so bidirectional blocks, prefix-LM masks and sliding windows stay as they were. Of two
    tokens with one source (a compensation token after the target at its span's last rank), the
    earlier does not see the later. Empty slots (``source = -1``) are hidden from every query and
    see only themselves. Bool masks stay bool; additive float masks keep their dtype and use its
    minimum for forbidden entries.
    """
    rows = gather_tokens(mask, source, 2)
    both = gather_tokens(rows, source, 3)
    t_new = source.shape[1]
    later = torch.ones(t_new, t_new, dtype=torch.bool, device=mask.device).triu(1)
    tie = (source[:, :, None] == source[:, None, :]) & later  # [B, T', T']
    empty = (source < 0)[:, None]  # [B, 1, T']
    hidden = tie[:, None] | empty[..., None, :] | empty[..., None]
    alone = torch.eye(t_new, dtype=torch.bool, device=mask.device) & empty[..., None]  # an empty slot's own entry
    if mask.dtype == torch.bool:
        return both & ~hidden | alone
    return both.masked_fill(hidden, torch.finfo(mask.dtype).min).masked_fill(alone, 0)
