"""Point everything after a stage at the shorter sequence (contract §5).

Every node downstream of the stage layer's output is the stage's *region*. Its inputs from
outside the region are rewired by what they are::

    hidden states of layer L   → compressed hidden states
    sequence length T          → sym_size(hidden', 1)      (SymInt, or literal ints when static)
    [.., T, ..] per-token data → gather_tokens(x, positions, dim, batch_dim)  (RoPE cos/sin, position ids,
                                  multi-axis [R, B, T, d] tables of the families that declare R rows;
                                  ``positions`` is the stage's source unless it numbers tokens afresh)
    [.., T, T] attention mask  → gather_mask(mask, source)      (rows and columns at the sources)
    sizes derived from T, and tensors made from sizes alone → computed again from T'
                                  (``E·T`` routing rows, ``T + k − 1`` convolution lengths)
    a pad of T up to a multiple of a chunk → T + pad − T'   (families with ``chunk_scans``: the scan
                                  keeps the prompt's padded length, the chunk count its loop was unrolled for)
    parameters, buffers, anything without T → unchanged

    view_9 = linear_21.view((2, s27, -1, 16))        cos_4 = cos_2.unsqueeze(1)
  → view_9 = linear_21.view((2, length, -1, 16))   → cos_4 = gather_tokens(cos_2, source, 1).unsqueeze(1)

    mul_63 = 4 * s22;  arange_6 = torch.arange(mul_63)              # (before the stage: sizes only)
    inv_perm[perm] = arange_6
  + mul_64 = 4 * length;  arange_7 = torch.arange(mul_64)
  → inv_perm[perm] = arange_7

    mod_1 = (64 - s22 % 64) % 64;  query_15 = pad(query_14, (0, 0, 0, mod_1))   # Gated DeltaNet
  + padded = s22 + mod_1;  keep = padded - length
  → query_15 = pad(query_14, (0, 0, 0, keep))

With a symbolic length every derived size is an expression of its symbol. A static graph knows only
ints: those equal to ``T`` are replaced, any other size derived from ``T`` is not (``check_shapes``
then refuses the graph, and says to mark the length dynamic, as ``libra_fx.compile`` does).

An input it cannot classify makes the graph unsupported. Because the regions of later stages
lie inside earlier ones, a later stage re-gathers what an earlier one produced.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes.context import PassResult, RewriteContext, Stage
from libra_fx.passes.fx_utils import (INSERTED, ancestors, call, count_inserted, descendants, descendants_of,
                                      is_size_like, value)
from libra_fx.runtime.compat import PAD_OPS, sympy_mod_types
from libra_fx.sequence.gather import gather_mask, gather_tokens

HIDDEN, LENGTH, MASK, SIZES, KEEP = "hidden", "length", "mask", "sizes", "keep"
PADS = PAD_OPS
MODS = sympy_mod_types()  # Mod, PythonMod: how a padding up to a multiple of a chunk is written
PADDED = "libra_fx_padded_length"  # meta of a kept chunk padding: the node of the padded length it keeps
WEIGHTS = re.compile(r"_(parameters|buffers)_")


def _mentions(x, symbols) -> bool:
    return isinstance(x, torch.SymInt) and bool(x.node.expr.free_symbols & symbols)


def classify(ctx: RewriteContext, node: fx.Node):
    """``LENGTH``, ``MASK``, ``("tokens", dim, batch_dim)``, ``SIZES`` or ``KEEP`` for an input from
    outside a region."""
    if node in ctx.derived:
        return ctx.derived[node]
    if node.meta.get(INSERTED):
        return KEEP
    v = value(node)
    seq = ctx.seq_len
    symbols = seq.node.expr.free_symbols if isinstance(seq, torch.SymInt) else set()
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        if is_size_like(v, seq):
            return LENGTH
        return SIZES if _mentions(v, symbols) else KEEP
    if not isinstance(v, torch.Tensor):
        return KEEP
    if node.op in ("placeholder", "get_attr") and WEIGHTS.search(str(node.target)):
        return KEEP
    shape = list(v.shape)
    seq_dims = [i for i, s in enumerate(shape) if is_size_like(s, seq)]
    if any(_mentions(s, symbols) for i, s in enumerate(shape) if i not in seq_dims):
        if _from_sizes(node):
            return SIZES
        raise UnsupportedGraph(f"{node.name} has shape {shape}, derived from the sequence length")
    if not seq_dims:
        return KEEP
    def batch_like(dim):
        return is_size_like(shape[dim], 1) or is_size_like(shape[dim], ctx.batch)

    if len(shape) == 4 and seq_dims == [2, 3] and batch_like(0):
        return MASK
    if len(seq_dims) == 1 and seq_dims[0] >= 1:
        dim = seq_dims[0]
        if _multi_axis(ctx, node, shape, dim) or (dim >= 2 and batch_like(dim - 1) and not batch_like(0)):
            return ("tokens", dim, dim - 1)  # multi-axis RoPE: [R, B, T, d] cos/sin, [R, B, T] position ids
        if batch_like(0):
            return ("tokens", dim, 0)
    raise UnsupportedGraph(f"{node.name} of shape {shape} is per-token data the pass cannot re-index")


def _from_sizes(node: fx.Node) -> bool:
    """Whether ``node`` is computed from sizes alone (``torch.arange(4 * s22)``): no tensor input."""
    return all(n.op == "call_function" or not isinstance(value(n), torch.Tensor) for n in ancestors(node) | {node})


def _multi_axis(ctx: RewriteContext, node: fx.Node, shape: list, dim: int) -> bool:
    """Whether ``node`` is an ``[R, B, T, …]`` table of the family's multi-axis positions: ``R`` one of
    its position rows, ``B`` the batch, and computed from integer ``[R, B, T]`` position ids. (A
    ``[B, 1, T, d]`` table whose ``B`` happens to equal ``R`` is not one.)"""
    if dim != 2 or shape[0] not in ctx.family.position_rows or not is_size_like(shape[1], ctx.batch):
        return False
    return any(_is_position_ids(ctx, n) for n in ancestors(node) | {node})


def _is_position_ids(ctx: RewriteContext, node: fx.Node) -> bool:
    v = value(node)
    return (isinstance(v, torch.Tensor) and v.dim() == 3 and not v.dtype.is_floating_point
            and v.shape[0] in ctx.family.position_rows and is_size_like(v.shape[1], ctx.batch)
            and is_size_like(v.shape[2], ctx.seq_len))


def _replacement(ctx: RewriteContext, stage: Stage, node: fx.Node, kind, made: dict, user: fx.Node) -> fx.Node:
    if kind == HIDDEN:
        return stage.hidden
    if kind == LENGTH:
        return stage.new_len
    if node not in made:
        graph = ctx.gm.graph
        with graph.inserting_before(user):  # ``node`` may be defined after the stage (e.g. in layer L+1)
            if kind == SIZES and _pads_to_a_chunk(ctx, node, user):
                made[node] = _keep_padded_length(ctx, stage, node)
            elif kind == SIZES:
                made[node] = _recompute(ctx, stage, node, made, user)
            elif kind == MASK:
                made[node] = call(graph, gather_mask, node, stage.source)
            else:
                positions = stage.source if stage.positions is None else stage.positions
                made[node] = call(graph, gather_tokens, node, positions, *kind[1:])
        ctx.derived[made[node]] = kind
    return made[node]


def _recompute(ctx: RewriteContext, stage: Stage, node: fx.Node, made: dict, user: fx.Node) -> fx.Node:
    """A copy of ``node`` (computed from sizes) whose inputs are the stage's: the new length for ``T``,
    copies for what is itself derived from it."""
    def rewired_input(arg: fx.Node) -> fx.Node:
        kind = classify(ctx, arg)
        if kind == KEEP:
            return arg
        if kind not in (LENGTH, SIZES):
            raise UnsupportedGraph(f"{node.name} is derived from the sequence length through {arg.name}, which is "
                                   "per-token data, not a size")
        return _replacement(ctx, stage, arg, kind, made, user)

    copy = ctx.gm.graph.node_copy(node, rewired_input)
    copy.meta = {k: v for k, v in node.meta.items() if k not in ("val", "example_value")}
    copy.meta[INSERTED] = True
    return copy


def _pads_to_a_chunk(ctx: RewriteContext, node: fx.Node, user: fx.Node) -> bool:
    """Whether ``node`` is how far ``user`` pads the sequence up to a multiple of a chunk
    (``Mod(-T, 64)``), in a family whose scans over such chunks are not changed by padding chunks."""
    v = value(node)
    return (ctx.family.chunk_scans and user.target in PADS
            and (PADDED in node.meta or isinstance(v, torch.SymInt) and v.node.expr.has(*MODS)))


def _keep_padded_length(ctx: RewriteContext, stage: Stage, node: fx.Node) -> fx.Node:
    """The padding that keeps the prompt's padded length ``P = T + pad``: ``P − T'``. The scan then runs
    the chunks its loop was unrolled for; the extra ones hold only padding."""
    graph = ctx.gm.graph
    padded = node.meta.get(PADDED)
    if padded is None:  # the first stage: T is the length the padding was computed from
        length = next(a for a in ancestors(node) if classify(ctx, a) == LENGTH)
        padded = call(graph, operator.add, length, node)
    keep = call(graph, operator.sub, padded, stage.new_len)
    keep.meta[PADDED] = padded
    return keep


def _replace_literal_length(arg, seq_len: int, new_len: fx.Node, swapped: list):
    def swap(x):
        if isinstance(x, int) and not isinstance(x, bool) and x == seq_len:
            swapped.append(x)
            return new_len
        return x

    return map_aggregate(arg, swap)


def visual_position_readers(ctx: RewriteContext) -> set[fx.Node]:
    """The nodes computed from where the visual tokens are (the placeholder masks) but not from the
    embeddings they were scattered into: what a decoder that adds visual features again at those
    positions (DeepStack) reads besides the hidden states."""
    masks = {scatter.args[1] for scatter in ctx.scatters}
    first = [u for m in masks for u in m.users if u not in ctx.scatters and not u.meta.get(INSERTED)]
    return descendants_of(first) - descendants_of(ctx.scatters)


def rewire(ctx: RewriteContext, stage: Stage, first: bool, readers: set[fx.Node],
           result: PassResult | None = None) -> list[str]:
    """Rewire ``stage``'s region; returns the re-indexed inputs (``"cos_2 → gather_tokens"``) and adds
    to ``result``'s counts: the distinct inputs rewired, by kind, and the nodes whose literal ``T`` was
    replaced."""
    own = {stage.hidden, stage.kinds, stage.source, stage.new_len, stage.hidden.args[0]}
    ctx.derived[stage.new_len] = LENGTH
    stage.region = descendants(stage.layer_output) - own
    made: dict[fx.Node, fx.Node] = {}
    direct: dict[fx.Node, str] = {}  # inputs replaced by the stage's own nodes: its hidden states, its length
    swapped: list = []
    literal_nodes = 0
    literal = first and isinstance(ctx.seq_len, int)
    for node in [n for n in ctx.gm.graph.nodes if n in stage.region and n.op != "output"]:
        for arg in node.all_input_nodes:
            if arg in stage.region:
                continue
            if arg in readers:
                raise UnsupportedGraph(
                    f"{node.name}, after the stage at layer {stage.layer}, reads where the visual tokens were "
                    f"({arg.name}, from the placeholder mask): the decoder adds visual features again after that "
                    "layer (DeepStack), so a stage must follow the last layer that does")
            kind = HIDDEN if arg is stage.layer_output else classify(ctx, arg)
            if kind != KEEP:
                node.replace_input_with(arg, _replacement(ctx, stage, arg, kind, made, node))
                if kind in (HIDDEN, LENGTH):
                    direct[arg] = kind
        if literal and not node.meta.get(INSERTED):
            before = len(swapped)
            node.args = _replace_literal_length(node.args, ctx.seq_len, stage.new_len, swapped)
            node.kwargs = _replace_literal_length(node.kwargs, ctx.seq_len, stage.new_len, swapped)
            literal_nodes += len(swapped) > before
    if result is not None:
        for kind in direct.values():
            result.count(f"rewired_{kind}")
        for dst in made.values():
            result.count(_made_key(ctx.derived[dst], dst))
        result.count("literal_lengths", literal_nodes)
    return [f"{src.name} → {dst.name}" for src, dst in made.items()]


def _made_key(kind, made: fx.Node) -> str:
    """The count a re-indexed input adds to: ``rewired_mask``, ``rewired_per_token``, ``rewired_sizes``
    (computed again from ``T'``), or ``kept_padded`` (a chunk padding that keeps the padded length)."""
    if PADDED in made.meta:
        return "kept_padded"
    return "rewired_per_token" if isinstance(kind, tuple) else f"rewired_{kind}"


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("rewire_sequence")
    already = count_inserted(ctx.gm.graph)
    readers = visual_position_readers(ctx)
    result.count("stages", len(ctx.stages))
    result.count("later_nodes", 0)
    for i, stage in enumerate(ctx.stages):
        gathered = rewire(ctx, stage, i == 0, readers, result)
        result.matched.append(
            f"layer {stage.layer}: {len(stage.region)} later nodes; re-indexed: {', '.join(gathered) or 'none'}"
        )
        result.count("later_nodes", len(stage.region))  # summed over stages (a later region lies inside an earlier)
    result.count("inserted", count_inserted(ctx.gm.graph) - already)
    return result
