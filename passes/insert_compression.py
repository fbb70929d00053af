"""Insert the selector + compressor node after each stage layer (SPEC §3–§4).

::

    hidden_states_33 = hidden_states_29 + down_proj_1            # output of layer L
  + stage = compress_visual_tokens(hidden_states_33, importance, span,
  +                                span_lens=((36,),), carried=0,
  +                                method='libra', ratio=0.5, tau=0.7, eta='mean')
  + hidden = stage[0]; span_1 = stage[1]; source = stage[2]; length = sym_size(hidden, 1)

Nothing uses the new nodes yet: ``rewire_sequence`` points the later layers at them.
"""

from __future__ import annotations

import operator

import torch

from libra_fx.fx_utils import call, value
from libra_fx.layout import compress_visual_tokens, visual_span_mask
from libra_fx.methods import get_method
from libra_fx.passes import PassResult, RewriteContext
from libra_fx.selectors import num_targets


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("insert_compression")
    graph, cfg = ctx.gm.graph, ctx.config
    compensation = int(get_method(cfg.method).compensation)
    span = None
    for i, stage in enumerate(ctx.stages):
        with graph.inserting_before(stage.layer_output.next):  # new nodes in program order
            if span is None:
                span = call(graph, visual_span_mask, ctx.visual_mask)
            node = call(
                graph, compress_visual_tokens, stage.layer_output, stage.importance, span,
                span_lens=stage.span_lens, carried=i * compensation, method=cfg.method, ratio=cfg.ratio, tau=cfg.tau, eta=cfg.eta,
            )
            stage.hidden = call(graph, operator.getitem, node, 0)
            stage.span = call(graph, operator.getitem, node, 1)
            stage.source = call(graph, operator.getitem, node, 2)
            stage.new_len = call(graph, torch.ops.aten.sym_size.int, stage.hidden, 1)
        span = stage.span
        sizes = [value(n) if isinstance(n, torch.fx.Node) else n for n in stage.span_lens[0]]
        result.matched.append(
            f"layer {stage.layer}: {cfg.method} "
            + ", ".join(f"{n} → {num_targets(n, cfg.ratio)}" for n in sizes)
            + (f" (+ {i + 1} compensation)" if compensation else "")
            + " tokens per span"
        )
    return result
