"""The fidelity plot: held-out accuracy (%) vs FLOPs ratio, drawn with matplotlib (``[viz]`` extra).

``benchmarks/fidelity.py`` calls ``fidelity_plot(rows, path)`` with its result rows; to redraw the
plot from a CSV it wrote, without re-running the benchmark::

    python -m libra_fx.reports.plot docs/fidelity.csv docs/fidelity.png

One line per method and schedule: solid for one stage (and the vision side, ``prumerge_fixed``),
dotted for two stages; a method measured once on a schedule (``prumerge``, ``prumerge_plus``: their
kept count is adaptive) is a single marker; the uncompressed model is the black square at (1, its
accuracy).
"""

from __future__ import annotations

import argparse
import ast
import csv

TEXT_FIELDS = ("method", "layout", "schedule", "layers", "visual_tokens")
UNCOMPRESSED = "uncompressed"
DOTTED = ("2 stages",)  # schedules drawn dotted; every other one is solid


def read_rows(path) -> list[dict]:
    """The rows of a ``fidelity.csv``: numbers as floats, the ``TEXT_FIELDS`` as strings."""
    with open(path, newline="") as f:
        return [{k: (v if k in TEXT_FIELDS else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def series(row: dict) -> str:
    """A row's line: its method, with its layout options when it has some (the vision-side methods)."""
    return f"{row['method']} ({row['layout']})" if row.get("layout") else row["method"]


def _matplotlib():
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ImportError("the fidelity plot needs matplotlib: pip install 'libra-fx[viz]'") from e
    return colormaps, FigureCanvasAgg, Figure, Line2D


def _schedule_label(schedule: str, layers: str) -> str:
    try:
        layers = ast.literal_eval(layers)
    except (ValueError, SyntaxError):
        return schedule
    if not layers:
        return f"{schedule} (before decoder layer 0)"
    return f"{schedule} (after layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))})"


def fidelity_plot(rows, path, title="Shapes LLaVA: held-out accuracy vs decoder FLOPs") -> list[str]:
    """Draw ``rows`` (``benchmarks/fidelity.py``'s, or ``read_rows``') to the PNG ``path`` with the Agg
    backend (no display); return the lines (:func:`series`) in the order they were drawn (that of ``rows``)."""
    colormaps, FigureCanvasAgg, Figure, Line2D = _matplotlib()
    methods = list(dict.fromkeys(series(r) for r in rows if r["method"] != UNCOMPRESSED))
    schedules = list(dict.fromkeys(r["schedule"] for r in rows if r["method"] != UNCOMPRESSED))
    palette = colormaps["tab10" if len(methods) <= 10 else "tab20"].colors

    fig = Figure(figsize=(10, max(5.6, 0.28 * (len(methods) + 6) + 1.0)), dpi=110)  # room for both legends
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, method in enumerate(methods):
        colour = palette[i % len(palette)]
        for schedule in schedules:
            pts = sorted((r["flops_ratio"], 100 * r["accuracy"]) for r in rows
                         if series(r) == method and r["schedule"] == schedule)
            if not pts:
                continue
            xs, ys = zip(*pts)
            if len(pts) == 1:  # measured once (adaptive keep): a single marker
                ax.plot(xs, ys, linestyle="none", marker="D", markersize=8, color=colour,
                        markeredgecolor="black", zorder=3)
            else:
                dotted = schedule in DOTTED
                ax.plot(xs, ys, linestyle=":" if dotted else "-", linewidth=1.8, marker="o",
                        markersize=3.5 if dotted else 5, color=colour, zorder=2)
    for r in rows:
        if r["method"] == UNCOMPRESSED:
            ax.plot([r["flops_ratio"]], [100 * r["accuracy"]], linestyle="none", marker="s", markersize=9,
                    color="black", zorder=4)

    ax.set_xlabel("FLOPs ratio (decoder FLOPs with compression / without)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(True, color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_xlim(right=1.03)

    handles = []
    for i, m in enumerate(methods):
        single = all(sum(series(r) == m and r["schedule"] == s for r in rows) <= 1 for s in schedules)
        handles.append(Line2D([], [], color=palette[i % len(palette)], label=m, **(
            dict(linestyle="none", marker="D", markersize=7, markeredgecolor="black") if single else dict(linewidth=2.5))))
    legend = ax.legend(handles=handles, title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       frameon=False, fontsize=9)
    ax.add_artist(legend)
    layers = {r["schedule"]: r.get("layers", "") for r in rows}
    counts = [sum(series(r) == m and r["schedule"] == s for r in rows) for m in methods for s in schedules]
    styles = [Line2D([], [], color="0.3", linestyle=":" if s in DOTTED else "-", marker="o", markersize=4,
                     label=_schedule_label(s, layers[s])) for j, s in enumerate(schedules)
              if max(counts[j::len(schedules)], default=0) > 1]  # drawn as a line by some method
    if 1 in counts:
        styles.append(Line2D([], [], color="0.3", linestyle="none", marker="D", markersize=7,
                             markeredgecolor="black", label="adaptive keep (one run)"))
    if any(r["method"] == UNCOMPRESSED for r in rows):
        styles.append(Line2D([], [], color="black", linestyle="none", marker="s", markersize=8, label=UNCOMPRESSED))
    ax.legend(handles=styles, title="schedule", loc="lower left", bbox_to_anchor=(1.01, 0.0), frameon=False,
              fontsize=9)
    fig.savefig(path, format="png", bbox_inches="tight")
    return methods


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Redraw the fidelity plot from a fidelity.csv.")
    p.add_argument("csv", help="e.g. docs/fidelity.csv (written by benchmarks/fidelity.py)")
    p.add_argument("png", help="e.g. docs/fidelity.png")
    args = p.parse_args(argv)
    fidelity_plot(read_rows(args.csv), args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
