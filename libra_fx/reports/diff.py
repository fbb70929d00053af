"""Graph diff: what the passes did to a captured graph, grouped by decoder layer.

::

    be = libra_fx.backend(ratio=0.5, layers=(1,), compiler="eager")
    ...compile and run...
    print(libra_fx.reports.diff.diff(be.last).text())        # or .html() for a self-contained page

Per group (a decoder layer, or ``<outside layers>``): op counts before → after, nodes added,
removed and rewired (inputs that now come from inserted nodes), and shape changes. Stage lengths are
named ``T0 = …, T1 = …`` so symbolic shapes read ``[1, s27, 64] → [1, T0, 64]``.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from libra_fx.passes.fx_utils import INSERTED, LAYER_PATH, module_path, value
from libra_fx.reports.printing import op_name

OUTSIDE = "<outside layers>"


def _group(node: fx.Node) -> str:
    """The decoder layer a node belongs to; an inserted node belongs where its first input does."""
    match = LAYER_PATH.match(module_path(node))
    if match:
        return f"{match['prefix']}.layers.{match['index']}".lstrip(".")
    if node.meta.get(INSERTED) and node.all_input_nodes:
        return _group(node.all_input_nodes[0])
    return OUTSIDE


def _shape(v) -> str | None:
    return str(list(v.shape)) if isinstance(v, torch.Tensor) else None


@dataclass
class GroupDiff:
    name: str
    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rewired: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewired or self.reshaped)


@dataclass
class GraphDiff:
    groups: list[GroupDiff]
    lengths: list[tuple[str, str]]  # (name, definition) of each stage's sequence length
    passes: list[str]

    def text(self) -> str:
        out = ["# libra-fx graph diff", ""]
        out += [f"{name} = {definition}" for name, definition in self.lengths] + [""]
        for g in self.groups:
            if not g.changed:
                continue
            ops = sorted(set(g.ops_before) | set(g.ops_after))
            counts = ", ".join(f"{op} {g.ops_before[op]}→{g.ops_after[op]}" for op in ops
                               if g.ops_before[op] != g.ops_after[op])
            out.append(f"## {g.name}: {sum(g.ops_before.values())} → {sum(g.ops_after.values())} ops"
                       + (f" ({counts})" if counts else ""))
            out += [f"  + {line}" for line in g.added]
            out += [f"  - {line}" for line in g.removed]
            out += [f"  ~ {line}" for line in g.rewired]
            out += [f"  # {line}" for line in g.reshaped]
            out.append("")
        out += ["## passes"] + [f"  {line}" for p in self.passes for line in p.splitlines()]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        colours = {"+": "#1a7f37", "-": "#cf222e", "~": "#9a6700", "#": "#57606a"}
        rows = []
        for line in self.text().splitlines():
            mark = line.strip()[:1]
            style = f' style="color:{colours[mark]}"' if mark in colours else (
                ' style="font-weight:bold"' if line.startswith("#") else "")
            rows.append(f"<span{style}>{html.escape(line)}</span>")
        body = "\n".join(rows)
        return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>libra-fx graph diff</title></head>"
                f"<body><pre style='font-family:monospace;font-size:13px'>\n{body}\n</pre></body></html>\n")


def _stage_lengths(after: fx.GraphModule) -> list[tuple[str, object, str]]:
    """``(name, length, where)`` of each stage: the ``sym_size`` nodes the passes inserted on a
    compressed sequence (not those reading an image's size), in order."""
    lengths = []
    for n in after.graph.nodes:
        if n.meta.get(INSERTED) and n.target is torch.ops.aten.sym_size.int and n.args[0].meta.get(INSERTED):
            layer = LAYER_PATH.match(_group(n))
            where = f"after layer {layer['index']}" if layer else "before layer 0: vision side"
            lengths.append((f"T{len(lengths)}", value(n), where))
    return lengths


def diff(record) -> GraphDiff:
    """The diff of a compressed :class:`~libra_fx.CompileRecord` (``backend.last``)."""
    if not record.compressed:
        raise ValueError(f"this graph was not compressed: {record.reason}")
    before = {n.name: n for n in record.before.graph.nodes}
    lengths = _stage_lengths(record.after)
    symbolic = [(str(length), name) for name, length, _ in lengths if isinstance(length, torch.SymInt)]

    def shape(v):
        s = _shape(v)
        for expr, name in symbolic:
            s = s and s.replace(expr, name)
        return s

    groups: dict[str, GroupDiff] = {}
    for n in record.before.graph.nodes:
        groups.setdefault(_group(n), GroupDiff(_group(n))).ops_before[op_name(n)] += 1
    for n in record.after.graph.nodes:
        g = groups.setdefault(_group(n), GroupDiff(_group(n)))
        g.ops_after[op_name(n)] += 1
        old = before.get(n.name)
        if n.meta.get(INSERTED) or old is None:
            g.added.append(f"{n.name} = {op_name(n)}({', '.join(a.name for a in n.all_input_nodes)})"
                           f"  {shape(value(n)) or ''}".rstrip())
            continue
        new_inputs = [a.name for a in n.all_input_nodes]
        if new_inputs != [a.name for a in old.all_input_nodes] or str(n.args) != str(old.args):
            g.rewired.append(f"{n.name}: {op_name(n)}({', '.join(new_inputs)})")
        old_shape, new_shape = _shape(value(old)), shape(value(n))
        if old_shape and new_shape and old_shape != new_shape:
            g.reshaped.append(f"{n.name}: {old_shape} → {new_shape}")
    kept = {n.name for n in record.after.graph.nodes}
    for name, n in before.items():
        if name not in kept:
            groups[_group(n)].removed.append(f"{name} = {op_name(n)}(...)")
    definitions = [(name, f"{length}  ({where})") for name, length, where in lengths]
    return GraphDiff(list(groups.values()), definitions, [str(p) for p in record.passes])
