"""Insert the importance row (contract §2) beside each stage layer's attention.

The layer keeps its own kernel; one ``1×T`` row is computed from the same query, key, mask and
scale (SDPA shown; eager ``softmax(q @ kᵀ · s + m)`` is matched the same way)::

    attn = scaled_dot_product_attention(q_embed, key, value, attn_mask=mask, scale=0.25)
  + importance = last_row_importance(q_embed, key, mask, 0.25)          # [B, T] float32

flash-attn's kernel (``flash_attention_2``) takes ``[B, T, H, d]`` tensors and no mask (causal)::

    out = flash_attn._flash_attn_forward(q, k, v, 0.0, 0.25, True, …)
  + importance = last_row_importance(q.transpose(1, 2), k.transpose(1, 2), None, 0.25)
"""

from __future__ import annotations

import torch

from libra_fx.errors import UnsupportedGraph
from libra_fx.methods.importance import last_row_importance
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.passes.fx_utils import call, count_inserted
from libra_fx.passes.matchers import AttentionKind, find_attention


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("insert_importance")
    graph = ctx.gm.graph
    already = count_inserted(graph)
    result.count("stages", len(ctx.stages))
    for stage in ctx.stages:
        site = find_attention(stage.layer, stage.layer_nodes)
        if site.kind is AttentionKind.FLASH and len(stage.span_lens) > 1:
            raise UnsupportedGraph("the samples hold different visual-token counts, whose empty slots need a mask; "
                                   "flash-attn takes none: use attn_implementation='sdpa'")
        stage.attention = site
        query, key = site.query, site.key
        if site.kind is AttentionKind.FLASH:
            with graph.inserting_before(site.node):
                query, key = (call(graph, torch.transpose, x, 1, 2) for x in (query, key))
        with graph.inserting_after(site.node):
            stage.importance = call(graph, last_row_importance, query, key, site.mask, site.scale)
        mask = site.mask.name if site.mask is not None else "causal"
        result.matched.append(f"layer {stage.layer}: {site.kind.value} attention {site.node.name} (mask {mask})")
        result.count("attention_rows")  # importance rows inserted
        result.count(f"{site.kind.value}_attention")  # the kernel matched: sdpa, eager or flash
        if site.mask is None:
            result.count("causal")  # the attention call takes no mask
    result.count("inserted", count_inserted(graph) - already)  # the rows, and the transposes of flash's q and k
    return result
