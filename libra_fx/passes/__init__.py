"""The FX passes of libra-fx, one per module, and the pipeline that runs them, in one place.

Each pass takes the shared :class:`~libra_fx.passes.context.RewriteContext`, reads or edits
``ctx.gm.graph`` in place and returns a :class:`~libra_fx.passes.context.PassResult` saying what it
matched and what it skipped (and why), in words and in counts; :func:`run_pipeline` logs each result
at DEBUG on the ``libra_fx.passes`` logger (``logging.basicConfig()`` and
``logging.getLogger("libra_fx").setLevel(logging.DEBUG)`` show them). A pass that meets a graph it
does not understand raises :class:`~libra_fx.UnsupportedGraph`; the backend then compiles the original
graph uncompressed, with a warning (or re-raises under ``strict=True``). A pass whose ``applies`` is
false for the method is recorded as skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from libra_fx.passes import (
    check_shapes,
    identify_family,
    insert_compression,
    insert_importance,
    insert_span_sizes,
    insert_vision_stage,
    locate_decoder,
    locate_visual_tokens,
    mask_padding_slots,
    return_side_outputs,
    rewire_sequence,
)
from libra_fx.passes.context import PassResult, RewriteContext

log = logging.getLogger("libra_fx.passes")


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[RewriteContext], PassResult]
    applies: Callable[[RewriteContext], bool] = lambda ctx: True
    needs: str = ""  # why it may not apply, for the record


def _side(ctx: RewriteContext) -> str:
    return ctx.config.spec.method.side


PIPELINE: tuple[Pass, ...] = (
    Pass("locate_visual_tokens", locate_visual_tokens.run),  # where the visual features enter
    Pass("identify_family", identify_family.run),  # the family adapter, or a named refusal
    Pass("locate_decoder", locate_decoder.run),  # decoder layers, each stage layer's output
    Pass("insert_span_sizes", insert_span_sizes.run),  # span lengths per sample, visual mask
    Pass("insert_importance", insert_importance.run, lambda c: _side(c) == "decoder", "a decoder-side method"),
    Pass("insert_compression", insert_compression.run, lambda c: _side(c) == "decoder", "a decoder-side method"),
    Pass("insert_vision_stage", insert_vision_stage.run, lambda c: _side(c) == "vision", "a vision-side method"),
    Pass("mask_padding_slots", mask_padding_slots.run, lambda c: c.config.spec.method.adaptive, "an adaptive method"),
    Pass("rewire_sequence", rewire_sequence.run),  # later layers see the shorter sequence
    Pass("return_side_outputs", return_side_outputs.run),  # decode layouts, records
    Pass("check_shapes", check_shapes.run),  # fake-tensor propagation proves every later shape
)


def run_pipeline(ctx: RewriteContext, passes: tuple[Pass, ...] = PIPELINE) -> list[PassResult]:
    """Run ``passes`` in order on ``ctx``; the graph is linted and recompiled at the end."""
    results = []
    for p in passes:
        if p.applies(ctx):
            results.append(p.run(ctx))
        else:
            results.append(PassResult(p.name, skipped=[f"needs {p.needs}; the method is {ctx.config.method}"]))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", results[-1])
    ctx.gm.graph.lint()
    ctx.gm.recompile()
    return results
