"""Insert the vision-side stage (PruMerge, PruMerge+, fixed): the merge at the projector's input, the
splice where the image features enter the language model, before decoder layer 0 (contract §6).

The [CLS] query and the keys come from the attention of the vision tower's *last* encoder layer
(``…vision_tower.encoder.layers.<last>``; the adapter says whether the family's tower has a [CLS]);
the features are the projector's input (the adapter names the projector)::

    attn_5 = scaled_dot_product_attention(queries_3, keys_3, values_3, scale=0.25)   # tower, last layer
    selected_image_feature = getitem(hidden_states, (slice(None), slice(1, None)))   # [S, N, Dv]
  + merge = vision_merge(selected_image_feature, queries_3, keys_3, method='prumerge', ratio=0.5,
  +                      slots=37, options=(('order', 'spatial'), ('positions', 'original')))
  + slots = merge[0]; ranks = merge[1]; valid = merge[2]
    hidden_states_15 = linear(slots, …)                                              # projector, on the slots
    ...
    inputs_embeds_1 = inputs_embeds.masked_scatter(mask, image_features)             # features enter
  + stage = vision_compress(inputs_embeds_1, span, ranks, valid, span_len=144, spans_per_sample=1,
  +                         slots=37, positions='original')
  + hidden = stage[0]; span_1 = stage[1]; source = stage[2]; valid_1 = stage[3]; positions = stage[4]
  + length = sym_size(hidden, 1)

The stage is prepended to ``ctx.stages`` so that ``rewire_sequence`` re-indexes masks by ``source``,
and position ids and RoPE by ``positions``, in the whole decoder; ``(source, valid, positions)``
become side outputs, the compressed layout that decode steps need (``libra_fx.state``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes.context import PassResult, RewriteContext, Stage
from libra_fx.passes.fx_utils import LAYER_PATH, ancestors, call, module_path, value
from libra_fx.passes.insert_span_sizes import show
from libra_fx.passes.matchers import find_attention
from libra_fx.sequence.splice import visual_span_mask
from libra_fx.sequence.vision import vision_compress, vision_merge


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
    if site.scale is not None and abs(site.scale - q.shape[-1] ** -0.5) > 1e-6 * q.shape[-1] ** -0.5:
        raise UnsupportedGraph(f"the vision tower's last attention scales by {site.scale}, not d^-½: its query may be "
                               "pre-scaled, and PruMerge needs q_proj's output")


def projector_input(graph: fx.Graph, features: fx.Node, projector: str, images: int, per_image: int,
                    before: list[fx.Node]) -> tuple[fx.Node, list[fx.Node]]:
    """The tower's features as the projector takes them (``[S, N, Dv]``), and the projector's nodes that
    read them, in program order; they must come after ``before`` (the [CLS] query and keys)."""
    inside = {n for n in ancestors(features) | {features} if projector in module_path(n).split(".")}
    found = {a for n in inside for a in n.all_input_nodes if a not in inside
             and getattr(value(a), "shape", None) is not None and tuple(value(a).shape[:2]) == (images, per_image)
             and value(a).dim() == 3}
    if len(found) != 1:
        raise UnsupportedGraph(f"PruMerge merges the tower's features at the projector's input, but the {projector!r} "
                               f"module upstream of the image features takes {len(found)} [{images}, {per_image}, D] "
                               "inputs (expected one)")
    (node,) = found
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = sorted((u for u in node.users if u in inside), key=order.get)
    if order[readers[0]] < max(order[b] for b in before):
        raise UnsupportedGraph("the projector reads the tower's features before the tower's last attention runs")
    return node, readers


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("insert_vision_stage")
    cfg, graph, method = ctx.config, ctx.gm.graph, ctx.config.spec.method
    if ctx.family.vision_tower is None or not ctx.family.vision_tower.cls_token:
        raise UnsupportedGraph(f"{cfg.method} needs a vision tower with a [CLS] token and is verified only on the "
                               f"families whose adapter says so; {ctx.family.name}'s does not")
    if len(ctx.scatters) != 1:
        raise UnsupportedGraph(f"{cfg.method} compresses images; found {len(ctx.scatters)} visual-feature insertions")
    visual = ctx.scatters[0]
    flat = [n for row in ctx.span_lens for n in row]
    if len(ctx.span_lens) != 1 or not all(isinstance(n, int) for n in flat) or len(set(flat)) != 1:
        raise UnsupportedGraph(f"{cfg.method} needs images of one static token count per graph, got spans "
                               f"{show(ctx.span_lens)}")
    per_image, spans_per_sample = flat[0], len(ctx.span_lens[0])
    tower, last, nodes = vision_last_layer(graph, visual.args[2])
    site = find_attention(last, nodes)
    images = ctx.batch * spans_per_sample
    _check_site(site, images, per_image)
    features, readers = projector_input(graph, visual.args[2], ctx.family.vision_tower.projector, images, per_image,
                                        [site.query, site.key])
    slots = method.capacity(per_image, cfg.ratio)
    options = cfg.spec.items()
    extra = dict(record=True) if ctx.record else {}

    with graph.inserting_before(readers[0]):
        merge = call(graph, vision_merge, features, site.query, site.key, method=cfg.method, ratio=cfg.ratio,
                     slots=slots, options=options, **extra)
        merged = [call(graph, operator.getitem, merge, i) for i in range(4 if ctx.record else 3)]
    for reader in readers:
        reader.replace_input_with(features, merged[0])
    with graph.inserting_before(visual.next):  # new nodes in program order, right after the features enter
        span = call(graph, visual_span_mask, ctx.visual_mask)
        node = call(graph, vision_compress, visual, span, merged[1], merged[2], span_len=per_image,
                    spans_per_sample=spans_per_sample, slots=slots, positions=cfg.spec.options.positions)
        outs = [call(graph, operator.getitem, node, i) for i in range(5)]
        new_len = call(graph, torch.ops.aten.sym_size.int, outs[0], 1)
    stage = Stage(-1, [], visual, ctx.span_lens, attention=site, hidden=outs[0], kinds=outs[1], source=outs[2],
                  positions=outs[4], new_len=new_len)
    ctx.stages.insert(0, stage)
    ctx.side_outputs.update(source=outs[2], valid=outs[3], positions=outs[4],
                            **({"records0": merged[3]} if ctx.record else {}))
    result.matched.append(f"vision tower {tower!r}: [CLS] attention of layer {last} ({site.kind.value} {site.node.name})")
    result.matched.append(f"projector input {features.name}: merged into {slots} slots per image "
                          f"({', '.join(f'{k}={v}' for k, v in options)})")
    result.matched.append(f"before decoder layer 0: {cfg.method} {per_image} → at most {slots} tokens per image")
    return result
