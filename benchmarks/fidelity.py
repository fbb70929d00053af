"""Fidelity harness: how much of the shipped shapes LLaVA's accuracy each method keeps.

For every method of ``libra_fx.methods.METHODS`` × keep ratio (50 %, 33 %, 20 %, 12.5 % of a
stage's visual tokens) × schedule (one stage after layer 4, two after layers 2 and 5), the model
runs through the real backend (``libra_fx.backend``, the passes' rewritten FX graph; ``--compiler
inductor`` hands it to Inductor too) on the held-out split, and the harness reports

* accuracy and its retention vs the uncompressed model,
* top-1 agreement with the uncompressed answer and the KL divergence of the answer distribution
  (``KL(uncompressed ‖ compressed)`` over the vocabulary, nats, mean over questions),
* visual tokens after each stage and the FLOPs ratio (SPEC §7, this model's d, m and 144 tokens),

plus the model's visual dependence per layer (accuracy when every visual token is dropped after
layer ``L``). Writes ``fidelity.md``, ``fidelity.csv`` and ``fidelity.png`` (accuracy vs FLOPs
ratio, one line per method and schedule) to ``--out``::

    python benchmarks/fidelity.py --n 512 --out docs/        # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import os
import time
import warnings

import torch

import libra_fx
from libra_fx import shapes_task as st
from libra_fx.flops import DecoderShape, total_flops
from libra_fx.methods import METHODS, visual_token_counts
from libra_fx.token_map import write_png

KEEP = (0.5, 0.33, 0.2, 0.125)
SCHEDULES = {"1 stage": st.DEFAULT_LAYERS, "2 stages": st.DEFAULT_TWO_STAGE_LAYERS}
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 200, 200),
           (240, 50, 230), (128, 128, 0), (0, 0, 128), (170, 110, 40)]


def ratio_of(keep: float) -> float:
    return round(1 - keep, 3)


def kl(base: torch.Tensor, other: torch.Tensor) -> float:
    p = base.log_softmax(-1)
    return (p.exp() * (p - other.log_softmax(-1))).sum(-1).mean().item()


def evaluate(model, data, method, ratio, layers, batch, compiler):
    torch._dynamo.reset()
    be = libra_fx.backend(ratio, layers, method, compiler=compiler, strict=True)
    forward = torch.compile(model.forward, backend=be, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = st.answer_logits(model, data, batch, forward)
    assert be.records and all(r.compressed for r in be.records), [r.reason for r in be.records]
    return logits


def plot(rows, path, width=720, height=440, xlim=(0.3, 1.0), ylim=(0.6, 1.0)):
    """Accuracy (y, ``ylim``) vs FLOPs ratio (x, ``xlim``): one polyline per method and schedule, solid
    for one stage, dotted for two; the uncompressed model is the black square at (1, its accuracy);
    grid lines at tenths of each range. Colours in the order of ``rows``' methods."""
    img = torch.full((height, width, 3), 255, dtype=torch.uint8)
    x0, y0, x1, y1 = 50, height - 40, width - 20, 20

    def px(fx, acc):
        fx = (fx - xlim[0]) / (xlim[1] - xlim[0])
        acc = min(max((acc - ylim[0]) / (ylim[1] - ylim[0]), 0.0), 1.0)
        return int(x0 + fx * (x1 - x0)), int(y0 - acc * (y0 - y1))

    for i in range(11):
        gx = px(xlim[0] + i / 10 * (xlim[1] - xlim[0]), ylim[0])[0]
        gy = px(xlim[0], ylim[0] + i / 10 * (ylim[1] - ylim[0]))[1]
        img[y1:y0 + 1, gx] = 225
        img[gy, x0:x1 + 1] = 225
        img[y0:y0 + 6, gx] = 0
        img[gy, x0 - 6:x0] = 0
    img[y1:y0 + 1, x0] = 0
    img[y0, x0:x1 + 1] = 0

    def dot(x, y, colour, r=3):
        img[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = torch.tensor(colour, dtype=torch.uint8)

    def line(a, b, colour, dotted):
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for t in range(n + 1):
            if dotted and (t // 4) % 2:
                continue
            x = round(a[0] + (b[0] - a[0]) * t / n)
            y = round(a[1] + (b[1] - a[1]) * t / n)
            img[y - 1:y + 1, x - 1:x + 1] = torch.tensor(colour, dtype=torch.uint8)

    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "uncompressed"))
    for r in rows:
        if r["method"] == "uncompressed":
            dot(*px(1.0, r["accuracy"]), (0, 0, 0), 5)
    for m_i, method in enumerate(methods):
        colour = PALETTE[m_i % len(PALETTE)]
        for s_i, schedule in enumerate(SCHEDULES):
            pts = sorted((r["flops_ratio"], r["accuracy"]) for r in rows
                         if r["method"] == method and r["schedule"] == schedule)
            pts = [px(*p) for p in pts]
            for a, b in zip(pts, pts[1:]):
                line(a, b, colour, dotted=s_i == 1)
            for p in pts:
                dot(*p, colour, 3 if s_i == 0 else 2)
    # legend: a colour swatch per method, in order, top-left inside the axes (names in the README)
    for m_i in range(len(methods)):
        y = y1 + 8 + 14 * m_i
        img[y:y + 8, x0 + 10:x0 + 34] = torch.tensor(PALETTE[m_i % len(PALETTE)], dtype=torch.uint8)
    write_png(path, img)
    return methods


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="held-out questions (a multiple of --batch)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--methods", nargs="*", default=None, help=f"default: all of {', '.join(METHODS)}")
    p.add_argument("--keep", nargs="*", type=float, default=list(KEEP))
    p.add_argument("--compiler", default="eager", choices=("eager", "inductor"))
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--no-dependence", action="store_true")
    p.add_argument("--out", default="docs")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from --out/fidelity.csv")
    args = p.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "fidelity.csv")) as f:
            rows = [{k: (v if k in ("method", "schedule", "layers", "visual_tokens") else float(v)) for k, v in r.items()}
                    for r in csv.DictReader(f)]
        return plot(rows, os.path.join(args.out, "fidelity.png"))
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

    rows = [dict(method="uncompressed", schedule="-", keep=1.0, ratio=0.0, layers="-",
                 visual_tokens=str(st.NUM_VISUAL_TOKENS), flops_ratio=1.0, accuracy=base_acc, retention=1.0,
                 top1_agreement=1.0, kl=0.0)]
    for method in methods:
        for schedule, layers in SCHEDULES.items():
            for keep in args.keep:
                ratio = ratio_of(keep)
                try:
                    logits = evaluate(model, data, method, ratio, layers, args.batch, args.compiler)
                except Exception as e:  # noqa: BLE001 — a method that cannot run here is reported, not fatal
                    print(f"{method} {schedule} keep {keep}: failed: {type(e).__name__}: {e}"[:300], flush=True)
                    continue
                acc = (logits.argmax(-1) == data["answer"]).float().mean().item()
                row = dict(method=method, schedule=schedule, keep=keep, ratio=ratio, layers=str(layers),
                           visual_tokens="→".join(str(n) for n in [st.NUM_VISUAL_TOKENS]
                                                  + visual_token_counts(st.NUM_VISUAL_TOKENS, ratio, len(layers), method)),
                           flops_ratio=total_flops(shape, method=method, ratio=ratio, layers=layers) / vanilla,
                           accuracy=acc, retention=acc / base_acc,
                           top1_agreement=(logits.argmax(-1) == base.argmax(-1)).float().mean().item(),
                           kl=kl(base, logits))
                rows.append(row)
                print(f"{method:8s} {schedule:8s} keep {keep:5.3f}: acc {acc:.4f} ({acc / base_acc:.1%}), "
                      f"agree {row['top1_agreement']:.3f}, KL {row['kl']:.4f}, FLOPs {row['flops_ratio']:.2f}, "
                      f"[{time.perf_counter() - started:.0f} s]", flush=True)
                write_outputs(rows, lines, args, base_acc)
    write_outputs(rows, lines, args, base_acc)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def write_outputs(rows, lines, args, base_acc):
    with open(os.path.join(args.out, "fidelity.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    methods = plot(rows, os.path.join(args.out, "fidelity.png"))
    keeps = sorted({r["keep"] for r in rows if r["method"] != "uncompressed"}, reverse=True)
    md = [f"Shapes LLaVA, {args.n} held-out questions, uncompressed accuracy {base_acc:.1%}. "
          "Cells: accuracy (retention vs uncompressed). Through `libra_fx.backend` "
          f"(compiler={args.compiler}).", ""] + lines
    for schedule, layers in SCHEDULES.items():
        md += [f"**{schedule}** (after layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}), "
               "keep per stage:", "",
               "| method | " + " | ".join(f"{k:.1%}".replace(".0%", "%") for k in keeps) + " |",
               "| --- |" + " ---: |" * len(keeps)]
        for method in methods:
            cells = []
            for k in keeps:
                r = next((r for r in rows if r["method"] == method and r["schedule"] == schedule and r["keep"] == k), None)
                cells.append("—" if r is None else f"{r['accuracy']:.1%} ({r['retention']:.1%})")
            md.append(f"| `{method}` | " + " | ".join(cells) + " |")
        md.append("")
    md += ["Every row (top-1 agreement, KL, tokens, FLOPs):", "",
           "| method | schedule | keep | visual tokens | FLOPs ratio | accuracy | retention | top-1 agreement | KL |",
           "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        md.append(f"| {r['method']} | {r['schedule']} | {r['keep']:.3g} | {r['visual_tokens']} | {r['flops_ratio']:.2f} | "
                  f"{r['accuracy']:.1%} | {r['retention']:.1%} | {r['top1_agreement']:.1%} | {r['kl']:.4f} |")
    md += ["", "Plot colours (in order): " + ", ".join(
        f"`{m}` rgb{PALETTE[i % len(PALETTE)]}" for i, m in enumerate(methods))]
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
