"""Matchers the passes share: a decoder layer's attention call, whatever its kernel.

::

    scaled_dot_product_attention(q, k, v, attn_mask=m, scale=s)          → SDPA
    softmax(matmul(q, k.transpose(2, 3)) * s [+ m])                      → EAGER
    flash_attn._flash_attn_forward(q, k, v, p, s, causal=True, …)        → FLASH ([B, T, H, d] q and k)
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes.fx_utils import MATMUL, SDPA, SOFTMAX


class AttentionKind(enum.Enum):
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH = "flash"  # query and key are [B, T, H, d]; no mask (causal)


@dataclass
class AttentionSite:
    node: fx.Node
    query: fx.Node
    key: fx.Node
    mask: fx.Node | None
    scale: float | None
    kind: AttentionKind


def _sdpa_site(node: fx.Node) -> AttentionSite:
    args = list(node.args) + [None] * 4
    mask = node.kwargs.get("attn_mask", args[3])
    return AttentionSite(node, args[0], args[1], mask, node.kwargs.get("scale"), AttentionKind.SDPA)


def _eager_site(softmax: fx.Node) -> AttentionSite | None:
    """Match ``softmax((q @ k.transpose(2, 3)) * scale [+ mask])``."""
    x = softmax.args[0]
    mask = None
    if x.target in (operator.add, torch.add, "add"):
        x, mask = x.args
    if x.target not in (operator.mul, torch.mul, "mul") or not isinstance(x.args[1], (int, float)):
        return None
    scores, scale = x.args
    if scores.target not in MATMUL:
        return None
    query, key_t = scores.args
    if not (isinstance(key_t, fx.Node) and key_t.target in ("transpose", torch.transpose)):
        return None
    return AttentionSite(softmax, query, key_t.args[0], mask, float(scale), AttentionKind.EAGER)


def _is_flash(node: fx.Node, variant: str = "") -> bool:
    return node.op == "call_function" and str(node.target).startswith(f"flash_attn._flash_attn{variant}_forward")


def _flash_site(node: fx.Node) -> AttentionSite:
    """``flash_attn::_flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, …)``."""
    args = list(node.args) + [None] * 6
    causal = node.kwargs.get("causal", args[5])
    if causal is not True:
        raise UnsupportedGraph(f"{node.name}: a flash-attn call that is not causal is not a decoder layer's")
    return AttentionSite(node, args[0], args[1], None, node.kwargs.get("softmax_scale", args[4]), AttentionKind.FLASH)


def find_attention(layer: int, nodes: list[fx.Node]) -> AttentionSite:
    """The one attention call among a layer's nodes (``UnsupportedGraph`` for none, several, or varlen flash)."""
    if any(_is_flash(n, "_varlen") for n in nodes):
        raise UnsupportedGraph(
            f"decoder layer {layer}: flash-attn's variable-length kernel (a padded batch under flash_attention_2) "
            "has no mask to re-index; use attn_implementation='sdpa' for padded batches"
        )
    sites = [_sdpa_site(n) for n in nodes if n.target in SDPA]
    sites += [s for n in nodes if n.target in SOFTMAX for s in [_eager_site(n)] if s is not None]
    sites += [_flash_site(n) for n in nodes if _is_flash(n)]
    if len(sites) != 1:
        raise UnsupportedGraph(
            f"decoder layer {layer}: expected one attention call (SDPA, flash-attn or eager softmax(q·kᵀ)), "
            f"found {len(sites)}"
        )
    return sites[0]
