"""What the passes share: the context they read and fill in, and the result each one returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from libra_fx.config import CompressionConfig


@dataclass
class PassResult:
    """One pass's record: what it matched (and did), and what it skipped, with the reason, in words;
    ``counts``: the same in numbers (``{"stages": 2, "inserted": 6, …}``), which tests assert on.

    A pass records its main counts always (``0`` included) and a count by kind only for the kinds it
    met, so a key it did not record counts ``0``. ``inserted`` is always the number of nodes the pass
    added to the graph (those marked ``libra_fx_inserted``)."""

    name: str
    matched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to ``counts[key]``."""
        self.counts[key] = self.counts.get(key, 0) + n

    def __str__(self) -> str:
        lines = [f"{self.name}:" + "".join(f" {k}={v}" for k, v in self.counts.items())]
        lines += [f"  matched {m}" for m in self.matched]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class Stage:
    """The nodes of one compression stage, filled in by the passes as they run."""

    layer: int  # the decoder layer after which it compresses (-1: before layer 0, vision side)
    layer_nodes: list[fx.Node]  # the nodes traced inside decoder layer ``layer``
    layer_output: fx.Node  # hidden states leaving it
    span_lens: tuple = ()  # visual tokens of each span of a sample entering the stage: ints or sym_size nodes
    attention: Any = None  # passes.matchers.AttentionSite
    importance: fx.Node | None = None
    hidden: fx.Node | None = None  # compressed hidden states
    kinds: fx.Node | None = None  # [B, T'] token kinds (text, merged target, compensation): the next stage's input
    source: fx.Node | None = None  # [B, T'] source index into the stage's input sequence (masks)
    positions: fx.Node | None = None  # [B, T'] index whose position ids / RoPE each token takes (None: source)
    new_len: fx.Node | None = None  # sym_size(hidden, 1)
    region: set[fx.Node] = field(default_factory=set)  # original nodes that see this stage's output


@dataclass
class RewriteContext:
    gm: fx.GraphModule
    config: CompressionConfig
    family: Any = None  # libra_fx.families.FamilyAdapter; found in the graph when not given
    # whether the forward around the graph hands decode steps the layouts the graph returns
    # (``libra_fx.compile`` does; a bare ``torch.compile`` backend cannot)
    serves_decode: bool = False
    record: bool = False  # return each stage's targets and token labels (kept-token maps; eager only)
    scatters: list[fx.Node] = field(default_factory=list)  # where visual features enter the embeddings
    decoder: dict[int, list[fx.Node]] = field(default_factory=dict)  # decoder layer index → its nodes
    num_layers: int = 0
    visual_mask: fx.Node | None = None  # the [B, T(, 1)] mask of every visual token
    span_lens: tuple = ()  # per sample (or one shared row): visual tokens of each span, ints or sym_size nodes
    batch: Any = None
    seq_len: Any = None  # the input sequence length: int, or SymInt when symbolic
    derived: dict[fx.Node, Any] = field(default_factory=dict)  # inserted per-token nodes → their kind
    stages: list[Stage] = field(default_factory=list)
    side_outputs: dict[str, fx.Node] = field(default_factory=dict)  # extra graph outputs for the forward around it
    original_shapes: dict[fx.Node, Any] = field(default_factory=dict)
