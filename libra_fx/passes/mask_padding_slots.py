"""Hide the padding slots of an adaptive vision-side stage from every decoder attention.

An adaptive method (``VisionMethod.adaptive``: PruMerge, PruMerge+) keeps a data-dependent number of
patches per image in a static number of slots; the unused slots are padding that no token may attend to::

    attn = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
  + mask_1 = mask_padding_slots(mask, valid)
    attn = scaled_dot_product_attention(q, k, v, attn_mask=mask_1, is_causal=False)

(eager attention: the mask added to the scores is replaced the same way). A bare backend warns that
decode steps on the returned cache would see the padding: only ``libra_fx.compile`` masks them there.
"""

from __future__ import annotations

import warnings

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.passes.fx_utils import call
from libra_fx.passes.matchers import AttentionKind, find_attention
from libra_fx.sequence.vision import mask_padding_slots


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("mask_padding_slots")
    graph, valid = ctx.gm.graph, ctx.side_outputs["valid"]
    made: dict = {}
    for index in sorted(ctx.decoder):
        site = find_attention(index, ctx.decoder[index])
        if site.kind is AttentionKind.FLASH:
            raise UnsupportedGraph(f"decoder layer {index}: flash-attn takes no mask to hide the padding slots; "
                                   f"use attn_implementation='sdpa' or 'eager' with {ctx.config.method}")
        if site.kind is AttentionKind.SDPA:
            if len(site.node.args) > 5:
                raise UnsupportedGraph(f"decoder layer {index}: SDPA with a positional is_causal argument")
            if site.mask not in made:
                with graph.inserting_before(site.node):
                    made[site.mask] = call(graph, mask_padding_slots, site.mask, valid)
            if len(site.node.args) > 3:
                site.node.args = site.node.args[:3] + (made[site.mask],) + site.node.args[4:]
            else:
                site.node.update_kwarg("attn_mask", made[site.mask])
            site.node.update_kwarg("is_causal", False)
        else:
            scores = site.node.args[0]
            if site.mask is None:
                raise UnsupportedGraph(f"decoder layer {index}: eager attention without a mask")
            if site.mask not in made:
                with graph.inserting_before(scores):
                    made[site.mask] = call(graph, mask_padding_slots, site.mask, valid)
            scores.replace_input_with(site.mask, made[site.mask])
    result.matched.append(f"{len(ctx.decoder)} decoder attention calls ignore the padding slots")
    result.count("attention_calls", len(ctx.decoder))
    result.count("masks", len(made))  # one per distinct original mask (the layers share theirs)
    if not ctx.serves_decode:
        warnings.warn(
            f"libra_fx: {ctx.config.method} under a bare torch.compile: forward outputs are exact, but decode steps on "
            "the returned KV cache would attend to its padding slots; for generate() use "
            f"libra_fx.compile(model, method={ctx.config.method!r})", UserWarning, stacklevel=2)
    return result
