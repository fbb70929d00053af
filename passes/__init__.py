"""The FX passes of libra-fx, one per module, and the pipeline that runs them in order.

Each pass takes the shared :class:`RewriteContext`, edits ``ctx.gm.graph`` in place and returns a
:class:`PassResult` saying what it matched and what it skipped (and why). A pass that meets a graph
it does not understand raises :class:`UnsupportedGraph`; the backend then compiles the original
graph uncompressed, with a warning (or re-raises under ``strict=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from libra_fx.config import CompressionConfig


class UnsupportedGraph(Exception):
    """The passes cannot rewrite this graph safely; the message says why."""


class NothingToCompress(Exception):
    """The graph holds no visual tokens (for example a text-only prompt): leave it as it is."""


@dataclass
class PassResult:
    name: str
    matched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.name}:"]
        lines += [f"  matched {m}" for m in self.matched]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class Stage:
    """The nodes of one compression stage, filled in by the passes as they run."""

    layer: int
    layer_nodes: list[fx.Node]  # the nodes traced inside decoder layer ``layer``
    layer_output: fx.Node  # hidden states leaving it
    span_lens: tuple  # visual tokens of each span of a sample entering the stage: ints or sym_size nodes
    attention: Any = None  # passes.insert_importance.AttentionSite
    importance: fx.Node | None = None
    hidden: fx.Node | None = None  # compressed hidden states
    span: fx.Node | None = None  # [B, T'] mask of the merged targets (next stage's span)
    source: fx.Node | None = None  # [B, T'] source index into the stage's input sequence
    new_len: fx.Node | None = None  # sym_size(hidden, 1)
    region: set[fx.Node] = field(default_factory=set)  # original nodes that see this stage's output


@dataclass
class RewriteContext:
    gm: fx.GraphModule
    config: CompressionConfig
    num_layers: int = 0
    visual_mask: fx.Node | None = None  # the model's [B, T(, 1)] image-placeholder mask
    batch: Any = None
    ragged_batches: bool = False  # whether samples may hold different visual-token counts
    mrope: bool = False  # 3-D (M-RoPE) position ids: per-token tables are [3, B, T, ...]
    seq_len: Any = None  # the input sequence length: int, or SymInt when symbolic
    derived: dict[fx.Node, Any] = field(default_factory=dict)  # inserted per-token nodes → their kind
    stages: list[Stage] = field(default_factory=list)
    original_shapes: dict[fx.Node, Any] = field(default_factory=dict)


from libra_fx.passes import (  # noqa: E402  (the passes import the classes above)
    check_shapes,
    insert_compression,
    insert_importance,
    insert_prumerge,
    locate_decoder,
    rewire_sequence,
)

PIPELINE = (
    locate_decoder.run,  # decoder layers, visual-token mask, span length, layer outputs
    insert_importance.run,  # one 1×T attention row per stage layer (hybrid attention)
    insert_compression.run,  # selector + compressor node after each stage layer
    insert_prumerge.run,  # vision-side methods only: PruMerge stage where the image features enter
    rewire_sequence.run,  # later layers see the shorter sequence: hidden, RoPE, masks, lengths
    check_shapes.run,  # fake-tensor propagation proves every later shape took the new length
)


def run_pipeline(ctx: RewriteContext) -> list[PassResult]:
    results = []
    for run in PIPELINE:
        results.append(run(ctx))
    ctx.gm.graph.lint()
    ctx.gm.recompile()
    return results
