"""Insert the vision-side stage (PruMerge, PruMerge+, fixed) where the image features enter the
language model, before decoder layer 0.

The [CLS] query and the keys come from the attention of the vision tower's *last* encoder layer
(``model.vision_tower.encoder.layers.<last>``: with LLaVA's ``vision_feature_layer=-2`` its q/k
are projections of exactly the hidden states the projector receives)::

    attn_5 = scaled_dot_product_attention(queries_3, keys_3, values_3, scale=0.25)   # tower, last layer
    ...
    inputs_embeds_1 = inputs_embeds.masked_scatter(mask, image_features)             # features enter
  + stage = vision_compress(inputs_embeds_1, span, queries_3, keys_3, 0.25,
  +                         span_len=144, spans_per_sample=1, method='prumerge', ratio=0.5, slots=36)
  + hidden = stage[0]; span_1 = stage[1]; source = stage[2]; valid = stage[3]
  + length = sym_size(hidden, 1)
    # adaptive methods only: every decoder attention masks the padding slots
  + mask_1 = mask_padding_slots(mask, valid)
    attn = scaled_dot_product_attention(q, k, v, attn_mask=mask_1, is_causal=False)

The stage is prepended to ``ctx.stages`` so that ``rewire_sequence`` re-indexes positions, RoPE,
masks and lengths of the whole decoder by ``source``; ``(source, valid)`` are appended to the graph's
outputs for generation (``libra_fx.vision_layout``). Runs only for the vision-side methods.
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from libra_fx import prumerge
from libra_fx.fx_utils import LAYER_PATH, ancestors, call, module_path, value
from libra_fx.layout import visual_span_mask
from libra_fx.passes import PassResult, RewriteContext, Stage, UnsupportedGraph
from libra_fx.passes.insert_importance import find_attention
from libra_fx.passes.locate_decoder import decoder_layers, find_visual_insertions, span_lengths
from libra_fx.vision_layout import mask_padding_slots, vision_compress

SIDE_OUTPUTS = "libra_fx_side_outputs"  # gm.meta key: how many trailing graph outputs are ours


def vision_last_layer(graph: fx.Graph, features: fx.Node) -> tuple[str, int, list[fx.Node]]:
    """The encoder layers (``…layers.<i>``) that the image features come from; their last one."""
    upstream = ancestors(features)
    groups: dict[str, dict[int, list[fx.Node]]] = {}
    for node in graph.nodes:
        match = LAYER_PATH.match(module_path(node))
        if match:
            groups.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(node)
    towers = [p for p, layers in groups.items() if any(n in upstream for nodes in layers.values() for n in nodes)]
    if not towers:
        raise UnsupportedGraph(
            "PruMerge needs the vision tower inside the compiled graph, but the image features come from outside it "
            "(transformers' generate() may encode images before forward: use libra_fx.compile, which keeps "
            "pixel_values flowing into forward; and compile with fullgraph=True)"
        )
    if len(towers) > 1:
        raise UnsupportedGraph(f"the image features come from several encoders {towers}; expected one vision tower")
    layers = groups[towers[0]]
    last = max(layers)
    return towers[0], last, layers[last]


def _check_site(site, images: int, per_image: int) -> None:
    q, k = value(site.query), value(site.key)
    if q is None or k is None or q.dim() != 4 or tuple(q.shape) != tuple(k.shape):
        raise UnsupportedGraph("the vision tower's last attention does not take [S, H, T, d] queries and keys of one shape")
    if q.shape[0] != images or q.shape[2] != per_image + 1:
        raise UnsupportedGraph(
            f"PruMerge needs a [CLS] token before the {per_image} patches of each of the {images} images; the vision "
            f"tower's last attention runs over {list(q.shape)} (is vision_feature_select_strategy 'default'?)"
        )
    if site.mask is not None:
        raise UnsupportedGraph("the vision tower's last attention has a mask; PruMerge expects full bidirectional attention")


def _mask_decoder_attention(ctx: RewriteContext, visual: fx.Node, valid: fx.Node) -> int:
    """Make every decoder attention ignore the padding slots; returns the number of calls changed."""
    graph = ctx.gm.graph
    _, layers = decoder_layers(graph, visual)
    made: dict[fx.Node | None, fx.Node] = {}
    for index in sorted(layers):
        site = find_attention(index, layers[index])
        if site.kind == "flash":
            raise UnsupportedGraph(f"decoder layer {index}: flash-attn takes no mask to hide the padding slots; "
                                   "use attn_implementation='sdpa' or 'eager' with PruMerge")
        if site.kind == "sdpa":
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
    return len(layers)


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("insert_prumerge")
    method, cfg = ctx.config.method, ctx.config
    if method not in prumerge.VISION_METHODS:  # a decoder-side method: nothing to do here
        return result
    graph = ctx.gm.graph
    scatters = find_visual_insertions(graph)
    if len(scatters) != 1:
        raise UnsupportedGraph(f"{method} compresses images; found {len(scatters)} visual-feature insertions")
    visual = scatters[0]
    features = visual.args[2]
    span_lens = span_lengths(ctx, scatters)  # one row of span lengths shared by all samples, or one per sample
    flat = [n for row in span_lens for n in row]
    if len(span_lens) != 1 or not all(isinstance(n, int) for n in flat) or len(set(flat)) != 1:
        raise UnsupportedGraph(f"{method} needs images of one static token count per graph, got spans {span_lens}")
    per_image, spans_per_sample = flat[0], len(span_lens[0])
    images = ctx.batch * spans_per_sample
    tower, last, nodes = vision_last_layer(graph, features)
    site = find_attention(last, nodes)
    _check_site(site, images, per_image)
    slots = prumerge.capacity(method, per_image, cfg.ratio)

    with graph.inserting_before(visual.next):  # new nodes in program order, right after the features enter
        span = call(graph, visual_span_mask, ctx.visual_mask)
        node = call(graph, vision_compress, visual, span, site.query, site.key, site.scale,
                    span_len=per_image, spans_per_sample=spans_per_sample, method=method,
                    ratio=cfg.ratio, slots=slots)
        outs = [call(graph, operator.getitem, node, i) for i in range(4)]
        new_len = call(graph, torch.ops.aten.sym_size.int, outs[0], 1)
    stage = Stage(-1, [], visual, span_lens, attention=site, hidden=outs[0], span=outs[1], source=outs[2],
                  new_len=new_len)
    ctx.stages.insert(0, stage)
    result.matched.append(
        f"vision tower {tower!r}: [CLS] attention of layer {last} ({site.kind} {site.node.name})"
    )
    result.matched.append(
        f"before decoder layer 0: {method} {per_image} → at most {slots} tokens per image"
        + (" (padding slots masked)" if method in prumerge.ADAPTIVE else "")
    )
    if method in prumerge.ADAPTIVE:
        changed = _mask_decoder_attention(ctx, visual, outs[3])
        result.matched.append(f"{changed} decoder attention calls ignore the padding slots")
        if not ctx.ragged_batches:  # set by libra_fx.compile, whose forward masks decode steps
            warnings.warn(
                f"libra_fx: {method} under a bare torch.compile: forward outputs are exact, but decode steps on "
                "the returned KV cache would attend to its padding slots; for generate() use "
                f"libra_fx.compile(model, method={method!r})", UserWarning, stacklevel=2)

    output = next(iter(graph.find_nodes(op="output")))
    returned = output.args[0]
    if not isinstance(returned, (tuple, list)):
        raise UnsupportedGraph("the graph does not return a tuple of outputs")
    output.args = (tuple(returned) + (outs[2], outs[3]),) + tuple(output.args[1:])
    ctx.gm.meta[SIDE_OUTPUTS] = 2
    return result
