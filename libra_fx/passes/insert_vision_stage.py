"""Insert the vision-side stage (a :class:`~libra_fx.methods.vision.VisionMethod`): the merge where the
method reads the image features, the splice where they enter the language model, before decoder layer 0
(contract §6).

The method's :class:`~libra_fx.methods.vision.Signal` says what the merge node takes, and the family
adapter's ``vision_tower`` where to find it (``None``: no vision-side method on the family):

- ``features``: the projector's input (``[S, N, Dv]``, the tower's features) or its output (``[S, N, D]``);
  the adapter names the projector;
- ``attention``: the query and keys of one attention layer of the tower (``…layers.<i>``): ``"last"``,
  its last encoder layer; ``"feature"``, the last layer the features come from. A method that needs a
  [CLS] token is refused on a tower without one (``VisionTower.cls_token``);
- ``cls_feature``: the [CLS] token's own feature, the row that the projector's input slices off.

PruMerge (the [CLS] attention of the last layer, the projector's input)::

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

(a features-only method's merge takes the features alone; at the projector's output it sits after the
projector, and the nodes that read the projected features read its slots). The stage is prepended to
``ctx.stages`` so that ``rewire_sequence`` re-indexes masks by ``source``, and position ids and RoPE by
``positions``, in the whole decoder; ``(source, valid, positions)`` become side outputs, the compressed
layout that decode steps need.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from libra_fx.errors import UnsupportedGraph
from libra_fx.methods.registry import get_vision_method
from libra_fx.passes.context import PassResult, RewriteContext, Stage
from libra_fx.passes.fx_utils import LAYER_PATH, ancestors, call, count_inserted, module_path, value
from libra_fx.passes.insert_span_sizes import show
from libra_fx.passes.matchers import find_attention
from libra_fx.sequence.splice import visual_span_mask
from libra_fx.sequence.vision import vision_compress, vision_merge


def tower_layer(graph: fx.Graph, features: fx.Node, which: str, method: str) -> tuple[str, int, list[fx.Node]]:
    """The encoder layers (``…layers.<i>``) that the image features come from: their tower, and the index and
    nodes of its ``"last"`` layer, or of the last one the features come from (``"feature"``)."""
    upstream = ancestors(features)
    groups: dict[str, dict[int, list[fx.Node]]] = {}
    for node in graph.nodes:
        match = LAYER_PATH.match(module_path(node))
        if match:
            groups.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(node)
    feeding = {prefix: [i for i, nodes in layers.items() if any(n in upstream for n in nodes)]
               for prefix, layers in groups.items()}
    towers = [p for p, used in feeding.items() if used]
    if not towers:
        raise UnsupportedGraph(
            f"{method} needs the vision tower inside the compiled graph, but the image features come from outside it "
            "(transformers' generate() may encode images before forward: use libra_fx.compile, which keeps "
            "pixel_values flowing into forward; and compile with fullgraph=True)"
        )
    if len(towers) > 1:
        raise UnsupportedGraph(f"the image features come from several encoders {towers}; expected one vision tower")
    layers = groups[towers[0]]
    index = max(layers) if which == "last" else max(feeding[towers[0]])
    return towers[0], index, layers[index]


def _check_site(site, images: int, tokens: int, per_image: int, method: str) -> None:
    q, k = value(site.query), value(site.key)
    if q is None or k is None or q.dim() != 4 or tuple(q.shape) != tuple(k.shape):
        raise UnsupportedGraph("the vision tower's attention does not take [S, H, T, d] queries and keys of one shape")
    if q.shape[0] != images or q.shape[2] != tokens:
        cls = "a [CLS] token before " if tokens > per_image else ""
        raise UnsupportedGraph(
            f"{method} needs {cls}the {per_image} patches of each of the {images} images in the vision tower's "
            f"attention, which runs over {list(q.shape)} (is vision_feature_select_strategy 'default'?)"
        )
    if site.mask is not None:
        raise UnsupportedGraph(f"the vision tower's attention has a mask; {method} expects full bidirectional "
                               "attention")
    if site.scale is not None and abs(site.scale - q.shape[-1] ** -0.5) > 1e-6 * q.shape[-1] ** -0.5:
        raise UnsupportedGraph(f"the vision tower's attention scales by {site.scale}, not d^-½: its query may be "
                               f"pre-scaled, and {method} needs q_proj's output")


def _projector(features: fx.Node, projector: str) -> set[fx.Node]:
    return {n for n in ancestors(features) | {features} if projector in module_path(n).split(".")}


def _shaped(node: fx.Node, images: int, per_image: int) -> bool:
    v = value(node)
    return getattr(v, "shape", None) is not None and v.dim() == 3 and tuple(v.shape[:2]) == (images, per_image)


def projector_input(graph: fx.Graph, features: fx.Node, projector: str, images: int, per_image: int,
                    before: list[fx.Node], method: str) -> tuple[fx.Node, list[fx.Node]]:
    """The tower's features as the projector takes them (``[S, N, Dv]``), and the projector's nodes that
    read them, in program order; they must come after ``before`` (e.g. the [CLS] query and keys)."""
    inside = _projector(features, projector)
    found = {a for n in inside for a in n.all_input_nodes if a not in inside and _shaped(a, images, per_image)}
    if len(found) != 1:
        raise UnsupportedGraph(f"{method} merges the tower's features at the projector's input, but the {projector!r} "
                               f"module upstream of the image features takes {len(found)} [{images}, {per_image}, D] "
                               "inputs (expected one)")
    return _in_order(graph, found.pop(), inside, before)


def projector_output(graph: fx.Graph, features: fx.Node, projector: str, images: int, per_image: int,
                     before: list[fx.Node], method: str) -> tuple[fx.Node, list[fx.Node]]:
    """The projected features (``[S, N, D]``: the projector's node read outside it), and the nodes outside
    the projector that read them, in program order; they must come after ``before``."""
    inside = _projector(features, projector)
    found = {n for n in inside if _shaped(n, images, per_image) and any(u not in inside for u in n.users)}
    if len(found) != 1:
        raise UnsupportedGraph(f"{method} reads the projected features at the projector's output, but the "
                               f"{projector!r} module upstream of the image features gives {len(found)} "
                               f"[{images}, {per_image}, D] outputs (expected one)")
    node = found.pop()
    return _in_order(graph, node, set(node.users) - inside, before)


CLS_DROPPED = (slice(None), slice(1, None))  # features[:, 1:]: the projector's input without the [CLS] row


def cls_source(features: fx.Node, images: int, per_image: int, method: str) -> fx.Node:
    """The tower's ``[S, 1+N, Dv]`` features that the projector's input slices the [CLS] row off."""
    source = features.args[0] if features.target is operator.getitem and features.args[1:] == (CLS_DROPPED,) else None
    v, x = value(source) if isinstance(source, fx.Node) else None, value(features)
    if v is None or v.dim() != 3 or tuple(v.shape) != (images, per_image + 1, x.shape[2]):
        raise UnsupportedGraph(f"{method} reads the [CLS] token's feature, but the projector's input "
                               f"{features.name} is not the tower's [{images}, 1 + {per_image}, D] features "
                               "with the [CLS] row sliced off")
    return source


def _in_order(graph: fx.Graph, node: fx.Node, readers: set[fx.Node], before: list[fx.Node]):
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = sorted((u for u in node.users if u in readers), key=order.get)
    if before and order[readers[0]] < max(order[b] for b in before):
        raise UnsupportedGraph("the image features are read before the vision tower's attention runs")
    return node, readers


def _check_tower(ctx: RewriteContext, method) -> None:
    name, tower, family = method.name, ctx.family.vision_tower, ctx.family.name
    if tower is None and method.signal.cls_token:
        raise UnsupportedGraph(f"{name} needs a vision tower with a [CLS] token and is verified only on the "
                               f"families whose adapter says so; {family}'s does not")
    if tower is None:
        raise UnsupportedGraph(f"{name} is a vision-side method, verified only on the families whose adapter "
                               f"describes their vision tower; {family}'s does not")
    if method.signal.cls_token and not tower.cls_token:
        raise UnsupportedGraph(f"{name} needs a [CLS] token before each image's patches in the vision tower's "
                               f"attention; {family}'s tower has none (its adapter's VisionTower.cls_token)")


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("insert_vision_stage")
    cfg, graph = ctx.config, ctx.gm.graph
    method = get_vision_method(cfg.method)
    signal = method.signal
    _check_tower(ctx, method)
    if len(ctx.scatters) != 1:
        raise UnsupportedGraph(f"{cfg.method} compresses images; found {len(ctx.scatters)} visual-feature insertions")
    visual = ctx.scatters[0]
    flat = [n for row in ctx.span_lens for n in row]
    if len(ctx.span_lens) != 1 or not all(isinstance(n, int) for n in flat) or len(set(flat)) != 1:
        raise UnsupportedGraph(f"{cfg.method} needs images of one static token count per graph, got spans "
                               f"{show(ctx.span_lens)}")
    per_image, spans_per_sample = flat[0], len(ctx.span_lens[0])
    images = ctx.batch * spans_per_sample
    slots = method.capacity(per_image, cfg.ratio)
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= per_image:
        raise ValueError(f"{cfg.method}.capacity({per_image}, {cfg.ratio}) must be a slot count in [1, {per_image}], "
                         f"got {slots!r}")
    already = count_inserted(graph)

    site, signal_args = None, ()
    if signal.attention is not None:
        tower, index, nodes = tower_layer(graph, visual.args[2], signal.attention, cfg.method)
        site = find_attention(index, nodes)
        _check_site(site, images, per_image + int(ctx.family.vision_tower.cls_token), per_image, cfg.method)
        signal_args = (site.query, site.key)
        cls = "[CLS] " if signal.cls_token else ""
        result.matched.append(f"vision tower {tower!r}: {cls}attention of layer {index} ({site.kind.value} "
                              f"{site.node.name})")
    find = projector_input if signal.features == "projector_input" else projector_output
    features, readers = find(graph, visual.args[2], ctx.family.vision_tower.projector, images, per_image,
                             list(signal_args), cfg.method)
    options = cfg.spec.items()
    extra = dict(record=True) if ctx.record else {}
    source = cls_source(features, images, per_image, cfg.method) if signal.cls_feature else None

    with graph.inserting_before(readers[0]):
        if source is not None:
            extra["cls"] = call(graph, operator.getitem, source, (slice(None), 0))  # [S, Dv]
        merge = call(graph, vision_merge, features, *signal_args, method=cfg.method, ratio=cfg.ratio,
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
    site_name = signal.features.replace("_", " ")
    result.matched.append(f"{site_name} {features.name}: merged into {slots} slots per image "
                          f"({', '.join(f'{k}={v}' for k, v in options)})")
    result.matched.append(f"before decoder layer 0: {cfg.method} {per_image} → at most {slots} tokens per image")
    result.count("images", images)  # per graph: samples × spans per sample
    result.count("patches_per_image", per_image)
    result.count("slots_per_image", slots)
    result.count("attention_inputs", len(signal_args))  # the tower attention's query and keys, or none
    result.count("cls_feature", int(source is not None))
    result.count("records", int(ctx.record))
    result.count("inserted", count_inserted(graph) - already)
    return result
