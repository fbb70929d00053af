"""Softmax-weighted sums over groups of tokens, one op for the compressors (contract §4, §6)::

    hidden [S, N, D], logits [S, N], group [S, N] (g in 0..G−1, or G: no group), G
        → out [S, G, D],  out[s, g] = Σ_{j: group[s, j] = g} softmax(logits[s, members of g])_j · hidden[s, j]

Segment reductions (a per-group maximum, then ``index_add``) cost ``O(N·D)``, where a dense
``[G, N]`` one-hot weight matrix times ``hidden`` costs ``O(G·N·D)``. It is a ``torch.library``
custom op with a fake kernel, so Inductor keeps it as one call instead of generating its own
scatter: on several threads those are atomic adds, whose float sums could change from run to run.
It has a backward, so the compressors stay differentiable.
"""

from __future__ import annotations

import torch


def _slots(group: torch.Tensor, groups: int) -> torch.Tensor:
    """Each token's row in the flat ``[S·(G+1)]`` group table (row ``G`` of a sample: no group)."""
    return (group + torch.arange(group.shape[0], device=group.device)[:, None] * (groups + 1)).reshape(-1)


def _weights(logits: torch.Tensor, slot: torch.Tensor, rows: int) -> torch.Tensor:
    """``[S·N]``: each token's softmax weight within its group."""
    flat = logits.reshape(-1)
    top = flat.new_full((rows,), float("-inf")).scatter_reduce_(0, slot, flat, "amax")
    weights = torch.exp(flat - top[slot])
    return weights / weights.new_zeros(rows).index_add_(0, slot, weights)[slot]


@torch.library.custom_op("libra_fx::group_softmax_sum", mutates_args=())
def group_softmax_sum(hidden: torch.Tensor, logits: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """``out[s, g]``: the members of group ``g`` weighted by the softmax of their logits (every group
    needs a member; tokens with ``group == groups`` are in none)."""
    s, n, d = hidden.shape
    slot, rows = _slots(group, groups), s * (groups + 1)
    weights = _weights(logits, slot, rows)
    out = hidden.new_zeros(rows, d).index_add_(0, slot, hidden.reshape(s * n, d) * weights[:, None])
    return out.view(s, groups + 1, d)[:, :groups].contiguous()


@group_softmax_sum.register_fake
def _(hidden, logits, group, groups):
    return hidden.new_empty(hidden.shape[0], groups, hidden.shape[2])


def _save(ctx, inputs, output):
    hidden, logits, group, groups = inputs
    ctx.save_for_backward(hidden, logits, group, output)
    ctx.groups = groups


def _backward(ctx, grad):
    """``∂/∂H_j = w_j·G_g`` and ``∂/∂l_j = w_j·G_g·(H_j − out_g)`` for token ``j`` of group ``g``."""
    hidden, logits, group, out = ctx.saved_tensors
    s, n, d = hidden.shape
    weights = _weights(logits, _slots(group, ctx.groups), s * (ctx.groups + 1)).reshape(s, n, 1)
    index = group[..., None].expand(s, n, d)
    pad = hidden.new_zeros(s, 1, d)  # the no-group row
    per_token = torch.cat([grad, pad], 1).gather(1, index)
    mean = torch.cat([out, pad], 1).gather(1, index)
    return weights * per_token, (weights * per_token * (hidden - mean)).sum(-1), None, None


group_softmax_sum.register_autograd(_backward, setup_context=_save)
