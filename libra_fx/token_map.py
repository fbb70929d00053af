"""Kept-token maps: which image patches each stage kept, merged (coloured by group), folded into
the compensation token (dark, hatched) or pruned (black), like the paper's Figure 1::

    tmap = token_map(model, inputs, method="libra", ratio=0.5, layers=(1, 2))
    write_png("map.png", render(tmap, inputs["pixel_values"][0]))

Panels, left to right: the image with its patch grid, then one per stage; a target patch (the
token a group keeps) has a white frame. Only sample 0's first image is drawn.
"""

from __future__ import annotations

import colorsys
import struct
import zlib
from dataclasses import dataclass

import torch

import libra_fx
from libra_fx.compressors import COMPENSATION, PRUNED
from libra_fx.layout import recording


@dataclass
class TokenMap:
    grid: int  # patches per side
    labels: list[torch.Tensor]  # per stage: [N0] group id per original patch (or COMPENSATION / PRUNED)
    targets: list[torch.Tensor]  # per stage: [N0] bool, the patch is (still) a target


def token_map(model, inputs, method="libra", ratio=0.5, layers=(1,), tau=0.7, eta="mean") -> TokenMap:
    """Run ``model`` once through the backend (FX graph run eagerly) and trace the patches' fate."""
    torch._dynamo.reset()
    be = libra_fx.backend(ratio, layers, method, tau, eta, strict=True, compiler="eager")
    with recording() as stages, torch.no_grad():
        torch.compile(model.forward, backend=be, fullgraph=True)(**inputs)
    torch._dynamo.reset()
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


def _colour(group: int) -> torch.Tensor:
    r, g, b = colorsys.hsv_to_rgb((group * 0.618034) % 1.0, 0.75, 0.95)
    return torch.tensor([r, g, b]) * 255


def render(tmap: TokenMap, image: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """``[H, W, 3]`` uint8: the image (min–max normalised) and one panel per stage."""
    img = image.float()
    img = ((img - img.min()) / (img.max() - img.min()).clamp_min(1e-8) * 255).permute(1, 2, 0)
    img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    size = img.shape[0]
    cell = size // tmap.grid
    panels = [img.clone()]
    panels[0][::cell, :] = 255
    panels[0][:, ::cell] = 255
    for label, target in zip(tmap.labels, tmap.targets):
        panel = img.clone()
        for p in range(tmap.grid * tmap.grid):
            y, x = (p // tmap.grid) * cell, (p % tmap.grid) * cell
            tile = panel[y:y + cell, x:x + cell]
            group = int(label[p])
            if group == PRUNED:
                tile.mul_(0.1)
            elif group == COMPENSATION:
                tile.mul_(0.25)
                for d in range(0, 2 * cell, 4):  # hatching
                    for i in range(max(0, d - cell + 1), min(cell, d + 1)):
                        tile[i, d - i] = 200
            else:
                tile.mul_(0.45).add_(0.55 * _colour(group))
            if target[p]:
                tile[:2], tile[-2:], tile[:, :2], tile[:, -2:] = 255, 255, 255, 255
        panels.append(panel)
    gap = torch.full((size, 6, 3), 255.0)
    row = [t for panel in panels for t in (panel, gap)][:-1]
    return torch.cat(row, dim=1).round().to(torch.uint8)


def write_png(path, rgb: torch.Tensor) -> None:
    """Write an ``[H, W, 3]`` uint8 tensor as a PNG (no imaging library needed)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(rgb[y].flatten().tolist()) for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
