"""Find where the visual features enter the token embeddings (reads, does not edit).

::

    special_image_mask = input_ids == 100                          # [B, T]
    inputs_embeds_1 = inputs_embeds.masked_scatter(mask, feats)    # ← ctx.scatters (one per modality)

A graph without such a node holds no visual tokens (``NothingToCompress``: compiled as it is),
unless it takes pixel values and tokens and runs a causal decoder: then the visual tokens arrive in
a way the passes cannot see, and the graph is unsupported. (A vision tower alone takes no tokens; its
attention may have a padding mask, SigLIP2's.)
"""

from __future__ import annotations

import torch.fx as fx

from libra_fx.errors import NothingToCompress, UnsupportedGraph
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.passes.fx_utils import SDPA, SOFTMAX, concrete, target_name, value


def has_causal_attention(graph: fx.Graph) -> bool:
    """Whether some attention call is causal (a decoder), not only bidirectional (a vision tower)."""
    for n in graph.nodes:
        if n.target in SDPA and (n.kwargs.get("is_causal") or n.kwargs.get("attn_mask") is not None
                                 or len(n.args) > 3 and n.args[3] is not None):
            return True
        if n.target in SOFTMAX and target_name(n.args[0]) in ("add", "add_"):
            return True
    return False


def find_visual_insertions(graph: fx.Graph) -> list[fx.Node]:
    """The ``masked_scatter`` nodes that put visual features into the token embeddings (one per
    modality: images, videos), in program order."""
    scatters = [n for n in graph.nodes if target_name(n) == "masked_scatter"]
    if scatters:
        return scatters
    inputs = [n.name.lower() for n in graph.find_nodes(op="placeholder")]
    takes_pixels = any("pixel" in name for name in inputs)
    takes_tokens = any("input_ids" in name or "inputs_embeds" in name for name in inputs)  # (not a tower alone)
    if takes_pixels and takes_tokens and has_causal_attention(graph):
        raise UnsupportedGraph(
            "the graph takes pixel values and runs a causal decoder, but has no masked_scatter of visual "
            "features into the token embeddings, so the visual tokens cannot be located (unsupported architecture?)"
        )
    raise NothingToCompress("no visual tokens enter a decoder in this graph (text-only input, or a vision-only part)")


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("locate_visual_tokens")
    ctx.scatters = find_visual_insertions(ctx.gm.graph)
    embeds = value(ctx.scatters[-1])
    ctx.batch, ctx.seq_len = concrete(embeds.shape[0]), concrete(embeds.shape[1])
    result.matched.append(f"visual features enter at {', '.join(n.name for n in ctx.scatters)}: "
                          f"batch {ctx.batch}, sequence length {ctx.seq_len}")
    result.count("scatters", len(ctx.scatters))  # one per modality (images, videos)
    return result
