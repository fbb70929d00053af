"""Insert the selector + compressor node after each stage layer (contract §3–§4).

::

    hidden_states_33 = hidden_states_29 + down_proj_1            # output of layer L
  + stage = compress_visual_tokens(hidden_states_33, importance, span,
  +                                span_lens=((36,),), carried=0, method='libra',
  +                                ratio=0.5, options=(('tau', 0.7), ('eta', 'mean')))
  + hidden = stage[0]; kinds_1 = stage[1]; source = stage[2]; length = sym_size(hidden, 1)

``kinds`` marks text, visual and compensation tokens (the first stage's: the visual-token mask); each
stage's ``kinds_1`` feeds the next. Nothing uses the new nodes yet: ``rewire_sequence`` points the later layers at them. Batches
whose samples hold different visual-token counts also get ``empty_slots_per_layer(source, …)``, a
side output that tells decode steps how many empty slots sit in front of each sample in each layer.
"""

from __future__ import annotations

import operator

import torch

from libra_fx.methods.selectors import num_targets
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.passes.fx_utils import call, count_inserted, value
from libra_fx.sequence.decode import empty_slots_per_layer
from libra_fx.sequence.splice import compress_visual_tokens, visual_span_mask


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("insert_compression")
    graph, cfg = ctx.gm.graph, ctx.config
    compensation = int(cfg.spec.method.compensation)
    already = count_inserted(graph)
    result.count("stages", len(ctx.stages))
    kinds = None
    for i, stage in enumerate(ctx.stages):
        with graph.inserting_before(stage.layer_output.next):  # new nodes in program order
            if kinds is None:
                kinds = call(graph, visual_span_mask, ctx.visual_mask)
            extra = dict(record=True) if ctx.record else {}
            node = call(graph, compress_visual_tokens, stage.layer_output, stage.importance, kinds,
                        span_lens=stage.span_lens, carried=i * compensation, method=cfg.method,
                        ratio=cfg.stage_ratio(i),
                        options=cfg.spec.items(), **extra)
            stage.hidden, stage.kinds, stage.source = (call(graph, operator.getitem, node, j) for j in range(3))
            stage.new_len = call(graph, torch.ops.aten.sym_size.int, stage.hidden, 1)
            if ctx.record:
                ctx.side_outputs[f"records{i}"] = call(graph, operator.getitem, node, 3)
                result.count("records")  # side outputs: a stage's targets and token labels
        kinds = stage.kinds
        sizes = [value(n) if isinstance(n, torch.fx.Node) else n for n in stage.span_lens[0]]
        result.matched.append(
            f"layer {stage.layer}: {cfg.method} "
            + ", ".join(f"{n} → {num_targets(n, cfg.stage_ratio(i))}" for n in sizes)
            + (f" (+ {i + 1} compensation)" if compensation else "")
            + " tokens per span"
        )
    if ctx.stages and len(ctx.span_lens) > 1:  # samples of different counts: empty slots in front
        with graph.inserting_after(ctx.stages[-1].new_len):
            ctx.side_outputs["empty_slots"] = call(graph, empty_slots_per_layer, *(s.source for s in ctx.stages),
                                                   layers=tuple(s.layer for s in ctx.stages),
                                                   num_layers=ctx.num_layers)
        result.matched.append("empty slots per stage and sample returned for decode")
        result.count("empty_slots")  # side output: empty slots per stage and sample, for decode
    result.count("compensation", len(ctx.stages) * compensation)  # compensation tokens per span after the last stage
    result.count("inserted", count_inserted(graph) - already)
    return result
