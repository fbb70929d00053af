"""Fidelity harness: how much of the shipped shapes LLaVA's accuracy each method keeps.

For every decoder-side method (``libra_fx.methods.DECODER_METHODS``) × keep ratio (50 %, 33 %, 20 %, 12.5 % of a
stage's visual tokens) × schedule (one stage after layer 4, two after layers 2 and 5), the model
runs through the real backend (``libra_fx.backend``, the passes' rewritten FX graph; ``--compiler
inductor`` hands it to Inductor too) on the held-out split, and the harness reports

* accuracy and its retention vs the uncompressed model,
* top-1 agreement with the uncompressed answer and the KL divergence of the answer distribution
  (``KL(uncompressed ‖ compressed)`` over the vocabulary, nats, mean over questions),
* visual tokens after each stage and the FLOPs ratio (contract §7, this model's d, m and 144 tokens),

plus the model's visual dependence per layer (accuracy when every visual token is dropped after
layer ``L``). The vision-side methods (``libra_fx.methods.VISION_METHODS``) compress once, before
decoder layer 0 (schedule "vision side"): ``prumerge_fixed`` at the same keep ratios, ``prumerge`` and
``prumerge_plus`` once each (adaptive: the row's keep is the measured mean kept count per picture,
extra token included, its FLOPs ratio the mean over pictures of each picture's measured count), each
in every layout of ``LAYOUTS`` (the ``order`` and ``positions`` options; column ``layout``). Writes ``fidelity.md``,
``fidelity.csv`` and ``fidelity.png`` (accuracy vs FLOPs ratio, one line per method and schedule,
drawn by ``libra_fx.reports.plot.fidelity_plot`` with matplotlib: ``pip install 'libra-fx[viz]'``) to
``--out``::

    python benchmarks/fidelity.py --n 512 --out docs/        # about 20 minutes on 2 cores
    python benchmarks/fidelity.py --n 1024 --out docs/ --methods prumerge prumerge_plus prumerge_fixed --merge
    python benchmarks/fidelity.py --plot-only --out docs/    # redraw docs/fidelity.png from docs/fidelity.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import time
import warnings

import torch

import libra_fx
from libra_fx.runtime import compat
from libra_fx import shapes_task as st
from libra_fx.reports.flops import DecoderShape, total_flops
from libra_fx.methods import METHODS, VISION_METHODS, get_method, is_vision_method, visual_token_counts

ADAPTIVE = tuple(name for name in VISION_METHODS if get_method(name).adaptive)
from libra_fx.reports.plot import fidelity_plot, read_rows, series

KEEP = (0.5, 0.33, 0.2, 0.125)
SCHEDULES = {"1 stage": st.DEFAULT_LAYERS, "2 stages": st.DEFAULT_TWO_STAGE_LAYERS}
VISION = "vision side"  # the vision-side methods' schedule: once, before decoder layer 0
LAYOUTS = tuple(dict(order=order, positions=positions) for order in ("spatial", "attention")
                for positions in ("original", "repacked"))  # the vision-side methods' options


def layout_name(options: dict) -> str:
    return f"{options['order']}, {options['positions']}"


def named(row: dict) -> str:
    """A row's method for the tables: ``\`prumerge\` (attention, repacked)``."""
    return f"`{row['method']}`" + (f" ({row['layout']})" if row.get("layout") else "")


def ratio_of(keep: float) -> float:
    return round(1 - keep, 3)


def kl(base: torch.Tensor, other: torch.Tensor) -> float:
    p = base.log_softmax(-1)
    return (p.exp() * (p - other.log_softmax(-1))).sum(-1).mean().item()


def configs(method, keeps):
    """``(schedule, layers, keep, spec)`` of each row of ``method``; ``keep=None``: adaptive (measured)."""
    if not is_vision_method(method):
        return [(schedule, layers, keep, libra_fx.method(method)) for schedule, layers in SCHEDULES.items()
                for keep in keeps]
    return [(VISION, (), keep, libra_fx.method(method, **layout)) for layout in LAYOUTS
            for keep in ([None] if method in ADAPTIVE else keeps)]


def evaluate(model, data, spec, ratio, layers, batch, compiler):
    """Logits through the backend, and (vision-side methods) the tokens per picture ``[N]`` (extra token
    included), read off the compiled graph's ``valid`` side output (``None`` for decoder-side methods)."""
    method = spec.name
    compat.reset_dynamo()
    be = libra_fx.backend(ratio, layers, spec, compiler=compiler, strict=True)
    forward = torch.compile(model.forward, backend=be, fullgraph=True)
    padding = []

    def run(**inputs):
        out = forward(**inputs)
        side = be.side_outputs
        if side is not None:  # source, valid: one picture per question, C slots each
            padding.append((~side["valid"]).sum(-1))
            be.side_outputs = None
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = st.answer_logits(model, data, batch, run)
    assert be.records and all(r.compressed for r in be.records), [r.reason for r in be.records]
    if not is_vision_method(method):
        return logits, None
    assert len(padding) * batch == len(logits), "a vision-side run returned no side outputs"
    return logits, get_method(method).capacity(st.NUM_VISUAL_TOKENS, ratio) - torch.cat(padding)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="held-out questions (a multiple of --batch)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--methods", nargs="*", default=None, choices=list(METHODS),
                   help=f"default: all of {', '.join(METHODS)}")
    p.add_argument("--merge", action="store_true", help="keep --out/fidelity.csv's rows of the other methods "
                   "(measured with the same --n and checkpoint) and replace those of --methods")
    p.add_argument("--keep", nargs="*", type=float, default=list(KEEP))
    p.add_argument("--compiler", default="eager", choices=("eager", "inductor"))
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--no-dependence", action="store_true")
    p.add_argument("--out", default="docs")
    p.add_argument("--plot-only", "--replot", dest="plot_only", action="store_true",
                   help="only redraw --out/fidelity.png from --out/fidelity.csv (no benchmark run)")
    args = p.parse_args(argv)
    if args.plot_only:
        path = os.path.join(args.out, "fidelity.png")
        methods = fidelity_plot(read_rows(os.path.join(args.out, "fidelity.csv")), path)
        print(f"wrote {path}")
        return methods
    methods = args.methods or list(METHODS)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()

    model = st.load_shapes_lvlm(args.checkpoint)
    text = model.config.text_config
    shape = DecoderShape("shapes-lvlm", text.hidden_size, text.intermediate_size, text.num_hidden_layers,
                         st.NUM_VISUAL_TOKENS, st.DEFAULT_TWO_STAGE_LAYERS, st.DEFAULT_LAYERS)
    vanilla = total_flops(shape)
    data = st.heldout(args.n)
    base = st.answer_logits(model, data, args.batch)
    base_acc = (base.argmax(-1) == data["answer"]).float().mean().item()
    print(f"uncompressed held-out accuracy ({args.n} questions): {base_acc:.4f}", flush=True)
    lines = []
    if not args.no_dependence:
        dep = st.visual_dependence(model, data, args.batch)
        lines += ["Visual dependence: held-out accuracy when every visual token is dropped after layer L "
                  "(L = −1: the language model never sees the picture)", "",
                  "| L | " + " | ".join(str(k) for k in dep) + " |", "| --- |" + " ---: |" * len(dep),
                  "| accuracy | " + " | ".join(f"{v:.1%}" for v in dep.values()) + " |", ""]
        print("\n".join(lines), flush=True)

    rows = [dict(method="uncompressed", layout="", schedule="-", keep=1.0, ratio=0.0, layers="-",
                 visual_tokens=str(st.NUM_VISUAL_TOKENS), flops_ratio=1.0, accuracy=base_acc, retention=1.0,
                 top1_agreement=1.0, kl=0.0)]
    if args.merge:
        old = read_rows(os.path.join(args.out, "fidelity.csv"))
        if old[0]["method"] != "uncompressed" or abs(old[0]["accuracy"] - base_acc) > 1e-9:
            raise SystemExit(f"--merge: {args.out}/fidelity.csv was measured on another split or model "
                             f"(uncompressed accuracy {old[0]['accuracy']:.4f}, now {base_acc:.4f})")
        rows += [r for r in old[1:] if r["method"] not in methods]
    n_vis = st.NUM_VISUAL_TOKENS
    for method in methods:
        for schedule, layers, keep, spec in configs(method, args.keep):
            ratio = 0.0 if keep is None else ratio_of(keep)
            layout = layout_name(dict(spec.items())) if is_vision_method(method) else ""
            try:
                logits, kept = evaluate(model, data, spec, ratio, layers, args.batch, args.compiler)
            except Exception as e:  # noqa: BLE001 — a method that cannot run here is reported, not fatal
                print(f"{method} {layout} {schedule} keep {keep}: failed: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            if kept is None:
                tokens = [n_vis] + visual_token_counts(n_vis, ratio, len(layers), method)
                flops = total_flops(shape, method=method, ratio=ratio, layers=layers)
            else:  # measured per picture: FLOPs of each picture's count, averaged
                keep = keep or kept.float().mean().item() / n_vis
                tokens = [n_vis, f"{kept.float().mean().item():.3g}"]
                flops = sum(total_flops(shape, method=method, ratio=ratio, kept=k) for k in kept.tolist()) / len(kept)
            acc = (logits.argmax(-1) == data["answer"]).float().mean().item()
            row = dict(method=method, layout=layout, schedule=schedule, keep=keep, ratio=ratio, layers=str(layers),
                       visual_tokens="→".join(map(str, tokens)), flops_ratio=flops / vanilla,
                       accuracy=acc, retention=acc / base_acc,
                       top1_agreement=(logits.argmax(-1) == base.argmax(-1)).float().mean().item(),
                       kl=kl(base, logits))
            rows.append(row)
            print(f"{method:8s} {layout} {schedule:8s} keep {keep:5.3f}: acc {acc:.4f} ({acc / base_acc:.1%}), "
                  f"agree {row['top1_agreement']:.3f}, KL {row['kl']:.4f}, FLOPs {row['flops_ratio']:.2f}, "
                  + ("" if kept is None else f"kept {kept.min().item()}–{kept.max().item()}, ")
                  + f"[{time.perf_counter() - started:.0f} s]", flush=True)
            write_outputs(rows, lines, args, base_acc)
    write_outputs(rows, lines, args, base_acc)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def write_outputs(rows, lines, args, base_acc):
    with open(os.path.join(args.out, "fidelity.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    methods = fidelity_plot(rows, os.path.join(args.out, "fidelity.png"))
    keeps = sorted({r["keep"] for r in rows if r["method"] not in ("uncompressed", *ADAPTIVE)}, reverse=True)
    md = [f"Shapes LLaVA, {args.n} held-out questions, uncompressed accuracy {base_acc:.1%}. "
          "Cells: accuracy (retention vs uncompressed). Through `libra_fx.backend` "
          f"(compiler={args.compiler}).", ""] + lines
    for schedule in [*SCHEDULES, VISION]:
        layers = SCHEDULES.get(schedule)
        in_table = [m for m in methods if any(series(r) == m and r["schedule"] == schedule and r["keep"] in keeps
                                              for r in rows)]
        if not in_table:
            continue
        md += [f"**{schedule}** (" + (f"after layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
                                      if layers else "once, before decoder layer 0") + "), keep" + " per stage" * bool(layers) + ":", "",
               "| method | " + " | ".join(f"{k:.1%}".replace(".0%", "%") for k in keeps) + " |",
               "| --- |" + " ---: |" * len(keeps)]
        for line in in_table:
            mine = [r for r in rows if series(r) == line and r["schedule"] == schedule]
            cells = []
            for k in keeps:
                r = next((r for r in mine if r["keep"] == k), None)
                cells.append("—" if r is None else f"{r['accuracy']:.1%} ({r['retention']:.1%})")
            md.append(f"| {named(mine[0])} | " + " | ".join(cells) + " |")
        md.append("")
    adaptive = [r for r in rows if r["method"] in ADAPTIVE]
    if adaptive:
        md += [f"**{VISION}, adaptive** (the kept count depends on the picture; mean over pictures, extra token "
               "included):", "", "| method | tokens per picture | keep | FLOPs ratio | accuracy (retention) |",
               "| --- | ---: | ---: | ---: | ---: |"]
        md += [f"| {named(r)} | {r['visual_tokens'].split('→')[-1]} | {r['keep']:.1%} | {r['flops_ratio']:.2f} | "
               f"{r['accuracy']:.1%} ({r['retention']:.1%}) |" for r in adaptive] + [""]
    md += ["Every row (top-1 agreement, KL, tokens, FLOPs):", "",
           "| method | schedule | keep | visual tokens | FLOPs ratio | accuracy | retention | top-1 agreement | KL |",
           "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        md.append(f"| {series(r)} | {r['schedule']} | {r['keep']:.3g} | {r['visual_tokens']} | {r['flops_ratio']:.2f} | "
                  f"{r['accuracy']:.1%} | {r['retention']:.1%} | {r['top1_agreement']:.1%} | {r['kl']:.4f} |")
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
