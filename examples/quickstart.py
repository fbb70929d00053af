"""Quickstart: ask the built-in shapes LLaVA about generated pictures, with and without compression.

The package ships a small LLaVA (``LlavaForConditionalGeneration``: a 2-layer CLIP tower, 144 visual
tokens, an 8-layer Llama) trained here on a synthetic shapes-VQA task (``libra_fx.shapes_task``). This
script runs on CPU in a minute or two, no downloads:

* it asks questions about new pictures with plain transformers and with
  ``libra_fx.compile(model, ratio=RATIO, layers=LAYERS)`` (Inductor + libra) and prints both answers,
* prints how many visual tokens the decoder layers see,
* measures held-out accuracy with and without compression,
* writes the kept-token map of the first picture to ``outputs/quickstart_token_map.png`` (at the
  repository root, git-ignored; drawn with Pillow: ``pip install 'libra-fx[viz]'``).

    python examples/quickstart.py
"""

from __future__ import annotations

import copy
import os
import time

import torch

import libra_fx
from libra_fx import shapes_task as st
from libra_fx.reports.token_map import render, token_map, write_png

RATIO, LAYERS = 0.75, st.DEFAULT_LAYERS  # remove 75 % of the visual tokens after decoder layer 4
# the pictures this demo draws: outputs/ at the repository root (git-ignored)
OUTPUTS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "outputs"))


def answers(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return [st.VOCAB[t] for t in out[:, -1].tolist()]


def main() -> None:
    torch.manual_seed(0)
    base = st.load_shapes_lvlm()
    text = base.config.text_config
    print(f"built-in shapes LLaVA: {text.num_hidden_layers} decoder layers, hidden {text.hidden_size}, "
          f"{st.NUM_VISUAL_TOKENS} visual tokens per picture, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters\n")

    demo = st.heldout(8, seed=7)  # two new pictures, four questions each
    inputs = st.model_inputs(demo)
    plain = answers(base, inputs)

    started = time.perf_counter()
    model = libra_fx.compile(copy.deepcopy(base), ratio=RATIO, layers=LAYERS, method="libra")
    compressed = answers(model, inputs)
    compile_s = time.perf_counter() - started

    for i in range(len(plain)):
        if i % 4 == 0:
            scene = demo["scenes"][i // 4]
            print(f"picture {i // 4 + 1}: " + ", ".join(f"{o.colour} {o.shape} (row {o.row}, col {o.col})"
                                                         for o in sorted(scene, key=lambda o: (o.row, o.col))))
        words = [st.VOCAB[t] for t in demo["input_ids"][i, -st.QUESTION_LEN:].tolist()]
        truth = st.VOCAB[demo["answer"][i]]
        print(f"  Q: {st.question_text(words):55s} truth: {truth:8s} transformers: {plain[i]:8s} "
              f"libra: {compressed[i]}")

    counts = libra_fx.visual_token_counts(st.NUM_VISUAL_TOKENS, RATIO, len(LAYERS), "libra")
    print(f"\nvisual tokens seen by the decoder layers (libra, ratio {RATIO}, compiled in {compile_s:.0f} s)")
    print(f"  layers 0..{LAYERS[0]}: {st.NUM_VISUAL_TOKENS}")
    print(f"  layers {LAYERS[0] + 1}..{text.num_hidden_layers - 1}: {counts[0]}   "
          f"({counts[0] - 1} merged + 1 compensation)")

    data = st.heldout(256)
    acc = st.accuracy(base, data, batch_size=64)
    acc_libra = st.accuracy(model, data, batch_size=64)
    print(f"\nheld-out accuracy, 256 questions: transformers {acc:.1%}, Inductor + libra {acc_libra:.1%} "
          f"({acc_libra / acc:.1%} kept)")

    tmap = token_map(base, st.model_inputs(demo, 0, 1), "libra", RATIO, LAYERS)
    os.makedirs(OUTPUTS, exist_ok=True)
    path = os.path.join(OUTPUTS, "quickstart_token_map.png")
    write_png(path, render(tmap, demo["pixel_values"][0], scale=3))
    print("kept-token map of picture 1 (left: the picture and its 12×12 patches; right: after layer "
          f"{LAYERS[0]} — a colour per merged group, white frames on targets, dark hatched = compensation "
          f"token): {path}")


if __name__ == "__main__":
    main()
