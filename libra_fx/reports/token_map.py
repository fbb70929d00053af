"""Kept-token maps: which image patches each stage kept, merged (coloured by group), folded into
the compensation token (dark, hatched) or pruned (black), like the paper's Figure 1::

    tmap = token_map(model, inputs, method="libra", ratio=0.5, layers=(1, 2))
    write_png("map.png", render(tmap, inputs["pixel_values"][0]))

Panels, left to right: the image with its patch grid, then one per stage; a target patch (the
token a group keeps) has a white frame. Only sample 0's first image is drawn. ``render`` and
``write_png`` draw with Pillow (``pip install 'libra-fx[viz]'``).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import torch

import libra_fx
from libra_fx.methods.compressors import COMPENSATION, PRUNED
from libra_fx.runtime.compat import with_own_code

WHITE = (255, 255, 255)
GAP = 6  # white pixels between panels


@dataclass
class TokenMap:
    grid: int  # patches per side
    labels: list[torch.Tensor]  # per stage: [N0] group id per original patch (or COMPENSATION / PRUNED)
    targets: list[torch.Tensor]  # per stage: [N0] bool, the patch is (still) a target


def token_map(model, inputs, method="libra", ratio=0.5, layers=(1,), tau=None, eta=None) -> TokenMap:
    """Run ``model`` once through the backend (FX graph run eagerly) and trace the patches' fate.

    The forward is compiled on its own copy of the forward's code, so Dynamo's caches of other compiled
    models (the user's own ``torch.compile`` of this model among them) are left as they are."""
    be = libra_fx.backend(ratio, layers, method, tau, eta, strict=True, compiler="eager", record=True)
    with torch.no_grad():
        torch.compile(with_own_code(model.forward), backend=be, fullgraph=True)(**inputs)
    stages = [r for name, records in be.side_outputs.items() if name.startswith("records") for r in records]
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    current = torch.arange(grid * grid)  # each patch's rank in the current span (or a label < 0)
    labels, targets = [], []
    was_target = torch.ones(grid * grid, dtype=torch.bool)
    for stage in stages:
        span_labels, span_targets = stage["labels"][0], stage["targets"][0]  # sample 0, first image
        alive = current >= 0
        label = torch.where(alive, span_labels[current.clamp_min(0)], current)
        is_target = was_target & alive & (label >= 0) & (current == span_targets[label.clamp_min(0)])
        labels.append(label)
        targets.append(is_target)
        was_target = is_target
        current = label  # a group's merged token is rank ``label`` of the next span
    return TokenMap(grid, labels, targets)


def _pillow():
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:
        raise ImportError("kept-token maps need Pillow: pip install 'libra-fx[viz]'") from e
    return Image, ImageDraw


def _colour(group: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((group * 0.618034) % 1.0, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def render(tmap: TokenMap, image: torch.Tensor, scale: int = 4):
    """An RGB ``PIL.Image.Image``: the image ``[3, H, W]`` (min–max normalised, ``scale`` × enlarged)
    with its patch grid, then one panel per stage, ``GAP`` white pixels apart."""
    Image, ImageDraw = _pillow()
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8) * 255
    h, w = img.shape[1:]
    picture = Image.fromarray(img.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy(), "RGB")
    picture = picture.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    size = picture.height
    cell = size // tmap.grid

    grid = picture.copy()
    draw = ImageDraw.Draw(grid)
    for k in range(0, size, cell):  # the patch grid, one white pixel wide
        draw.line([(k, 0), (k, size - 1)], fill=WHITE)
        draw.line([(0, k), (picture.width - 1, k)], fill=WHITE)
    panels = [grid]
    for label, target in zip(tmap.labels, tmap.targets):
        panel = picture.copy()
        for p in range(tmap.grid * tmap.grid):
            box = ((p % tmap.grid) * cell, (p // tmap.grid) * cell)
            box = (*box, box[0] + cell, box[1] + cell)
            tile = panel.crop(box)
            group = int(label[p])
            if group == PRUNED:  # near-black
                tile = Image.eval(tile, lambda v: round(v * 0.1))
            elif group == COMPENSATION:  # dark, hatched
                tile = Image.eval(tile, lambda v: round(v * 0.25))
                hatch = ImageDraw.Draw(tile)
                for d in range(0, 2 * cell, 4):
                    hatch.line([(d, 0), (0, d)], fill=(200, 200, 200))
            else:  # tinted with the group's colour
                tile = Image.blend(tile, Image.new("RGB", tile.size, _colour(group)), 0.55)
            if target[p]:  # the token the group keeps: a white frame
                ImageDraw.Draw(tile).rectangle([0, 0, cell - 1, cell - 1], outline=WHITE, width=2)
            panel.paste(tile, box[:2])
        panels.append(panel)

    out = Image.new("RGB", (len(panels) * (picture.width + GAP) - GAP, size), WHITE)
    for i, panel in enumerate(panels):
        out.paste(panel, (i * (picture.width + GAP), 0))
    return out


def write_png(path, picture) -> None:
    """Save a ``PIL.Image.Image`` (e.g. ``render``'s) as a PNG."""
    _pillow()
    picture.save(path, format="PNG")
