"""Inspect what the passes did: a graph diff (text and HTML) and kept-token maps (PNG).

Writes into ``docs/`` (docs/api.md shows these files)::

    python examples/inspect_compression.py
"""

from __future__ import annotations

import os

import torch

import libra_fx
from libra_fx.reports.diff import diff
from libra_fx.testing import synthetic_image, tiny_llava, tiny_llava_inputs
from libra_fx.reports.token_map import render, token_map, write_png

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    inputs["pixel_values"] = synthetic_image(model.config.vision_config.image_size)[None]

    be = libra_fx.backend(ratio=0.5, layers=(1,), method="libra", strict=True, compiler="eager")
    with torch.no_grad():
        torch.compile(model.forward, backend=be, fullgraph=True)(**inputs)
    graph_diff = diff(be.last)
    for name, text in (("graph_diff.txt", graph_diff.text()), ("graph_diff.html", graph_diff.html())):
        with open(os.path.join(OUT, name), "w") as f:
            f.write(text)

    for method in ("libra", "fastv", "turbo"):
        tmap = token_map(model, inputs, method=method, ratio=0.5, layers=(1, 2))
        write_png(os.path.join(OUT, f"token_map_{method}.png"), render(tmap, inputs["pixel_values"][0]))
    print(f"wrote graph_diff.txt, graph_diff.html and token_map_{{libra,fastv,turbo}}.png to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
