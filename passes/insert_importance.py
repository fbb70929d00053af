"""Insert the importance row (SPEC §2) beside each stage layer's attention.

The layer keeps its own kernel; one ``1×T`` row is computed from the same query, key, mask and
scale (SDPA shown; eager ``softmax(q @ kᵀ · s + m)`` is matched the same way)::

    attn = scaled_dot_product_attention(q_embed, key, value, attn_mask=mask, scale=0.25)
  + importance = last_row_importance(q_embed, key, mask, 0.25)          # [B, T] float32

flash-attn's kernel (``flash_attention_2``) takes ``[B, T, H, d]`` tensors and no mask (causal)::

    out = flash_attn._flash_attn_forward(q, k, v, 0.0, 0.25, True, …)
  + importance = last_row_importance(q.transpose(1, 2), k.transpose(1, 2), None, 0.25)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from libra_fx.fx_utils import MATMUL, SDPA, SOFTMAX, call
from libra_fx.importance import last_row_importance
from libra_fx.passes import PassResult, RewriteContext, UnsupportedGraph



@dataclass
class AttentionSite:
    node: fx.Node
    query: fx.Node
    key: fx.Node
    mask: fx.Node | None
    scale: float | None
    kind: str  # "sdpa", "eager" or "flash" (``[B, T, H, d]`` query and key)


def _sdpa_site(node: fx.Node) -> AttentionSite:
    args = list(node.args) + [None] * 4
    mask = node.kwargs.get("attn_mask", args[3])
    return AttentionSite(node, args[0], args[1], mask, node.kwargs.get("scale"), "sdpa")


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
    return AttentionSite(softmax, query, key_t.args[0], mask, float(scale), "eager")


def _is_flash(node: fx.Node, variant: str = "") -> bool:
    return node.op == "call_function" and str(node.target).startswith(f"flash_attn._flash_attn{variant}_forward")


def _flash_site(node: fx.Node) -> AttentionSite:
    """``flash_attn::_flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, …)``."""
    args = list(node.args) + [None] * 6
    causal = node.kwargs.get("causal", args[5])
    if causal is not True:
        raise UnsupportedGraph(f"{node.name}: a flash-attn call that is not causal is not a decoder layer's")
    return AttentionSite(node, args[0], args[1], None, node.kwargs.get("softmax_scale", args[4]), "flash")


def find_attention(layer: int, nodes: list[fx.Node]) -> AttentionSite:
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


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("insert_importance")
    graph = ctx.gm.graph
    for stage in ctx.stages:
        site = find_attention(stage.layer, stage.layer_nodes)
        if site.kind == "flash" and len(stage.span_lens) > 1:
            raise UnsupportedGraph("the samples hold different visual-token counts, whose empty slots need a mask; "
                                   "flash-attn takes none: use attn_implementation='sdpa'")
        stage.attention = site
        query, key = site.query, site.key
        if site.kind == "flash":
            with graph.inserting_before(site.node):
                query, key = (call(graph, torch.transpose, x, 1, 2) for x in (query, key))
        with graph.inserting_after(site.node):
            stage.importance = call(graph, last_row_importance, query, key, site.mask, site.scale)
        mask = site.mask.name if site.mask is not None else "causal"
        result.matched.append(f"layer {stage.layer}: {site.kind} attention {site.node.name} (mask {mask})")
    return result
