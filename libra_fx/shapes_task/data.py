"""Shapes-VQA data: the vocabulary, scenes, questions, pictures and batches (the held-out split).

Everything here is generated from a seed, on the CPU (``render`` runs on the objects' device); see
the package docstring (``libra_fx.shapes_task``) for the task itself.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------- vocabulary
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "above", "below")
COUNTS = tuple(str(i) for i in range(9))
RGB = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.75, 0.25), "blue": (0.2, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}

SPECIAL = ("<pad>", "<bos>", "<image>", "?", "-", "any")
QUESTION_WORDS = ("is-there", "how-many", "what-colour", "what-shape")
ANSWERS = COLOURS + SHAPES + COUNTS + ("yes", "no", "nothing")
VOCAB = SPECIAL + QUESTION_WORDS + DIRECTIONS + ANSWERS
TOKEN = {word: i for i, word in enumerate(VOCAB)}
PAD_TOKEN_ID, BOS_TOKEN_ID, IMAGE_TOKEN_ID = TOKEN["<pad>"], TOKEN["<bos>"], TOKEN["<image>"]
ANSWER_IDS = torch.tensor([TOKEN[a] for a in ANSWERS])
VOCAB_SIZE = 64  # room to spare

IMAGE_SIZE, PATCH_SIZE, GRID = 96, 8, 4
PIXEL_MEAN, PIXEL_STD = 0.45, 0.27  # pixel values are (RGB in [0, 1] - mean) / std, on every channel
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144
QUESTION_LEN = 5
PROMPT_LEN = 1 + NUM_VISUAL_TOKENS + QUESTION_LEN
QTYPES = ("exists", "count", "rel_colour", "rel_shape")
HELDOUT_SEED = 20_240_601  # the held-out split; training streams use other seeds (see ``batches``)

# The shipped model's compression schedules: one stage after layer 4, two after layers 2 and 5.
# Measured on the shipped model (held-out): it reads the picture mostly in layers 2–5 (dropping every
# visual token after layer 1 / 2 / 3 / 4 / 5 leaves 38 / 37 / 51 / 54 / 88 % of its 99.7 %). A stage
# after layer 4 is the earliest where `libra` at R=0.5 keeps ≥ 98 % (after layer 3: about 97.7 %,
# after layer 2: about 96 %), while dropping all visual tokens there still costs about 45 points.
DEFAULT_LAYERS = (4,)
DEFAULT_TWO_STAGE_LAYERS = (2, 5)


@dataclass(frozen=True)
class Difficulty:
    min_objects: int
    max_objects: int
    qtypes: tuple[str, ...]
    nothing_rate: float  # share of relational questions about an empty neighbouring cell
    jitter: float  # 0..1: how far a shape may wander inside its cell


DIFFICULTIES = {
    1: Difficulty(1, 4, ("exists", "count"), 0.0, 0.3),
    2: Difficulty(2, 6, QTYPES, 0.0, 0.6),
    3: Difficulty(3, 8, QTYPES, 0.2, 1.0),
}


# ------------------------------------------------------------------------------------------ scenes
@dataclass
class Obj:
    row: int
    col: int
    shape: str
    colour: str
    cy: float  # centre, pixels
    cx: float
    radius: float


def sample_scene(rng: random.Random, difficulty: int = 3) -> list[Obj]:
    d = DIFFICULTIES[difficulty]
    n = rng.randint(d.min_objects, d.max_objects)
    cells = rng.sample(range(GRID * GRID), n)
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLOURS], n)
    cell = IMAGE_SIZE / GRID
    objs = []
    for pos, (shape, colour) in zip(cells, kinds):
        radius = rng.uniform(7.5, 10.0)
        slack = max(cell / 2 - radius - 1, 0) * d.jitter
        row, col = divmod(pos, GRID)
        objs.append(Obj(row, col, shape, colour, (row + 0.5) * cell + rng.uniform(-slack, slack),
                        (col + 0.5) * cell + rng.uniform(-slack, slack), radius))
    return objs


_STEP = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}


def neighbour(scene: list[Obj], obj: Obj, direction: str) -> Obj | None:
    dr, dc = _STEP[direction]
    return next((o for o in scene if (o.row, o.col) == (obj.row + dr, obj.col + dc)), None)


def sample_question(rng: random.Random, scene: list[Obj], qtype: str, difficulty: int = 3) -> tuple[list[str], str]:
    """``(five question words, answer word)`` for ``qtype`` about ``scene``."""
    d = DIFFICULTIES[difficulty]
    if qtype == "exists":
        if rng.random() < 0.5:
            o = rng.choice(scene)
            shape, colour = o.shape, o.colour
        else:
            present = {(o.shape, o.colour) for o in scene}
            shape, colour = rng.choice([(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present])
        return ["is-there", "-", colour, shape, "?"], "yes" if any(
            (o.shape, o.colour) == (shape, colour) for o in scene) else "no"
    if qtype == "count":
        kind = rng.choice(("colour", "shape", "all"))
        if kind == "colour":
            c = rng.choice(COLOURS)
            return ["how-many", "-", c, "any", "?"], str(sum(o.colour == c for o in scene))
        if kind == "shape":
            s = rng.choice(SHAPES)
            return ["how-many", "-", "any", s, "?"], str(sum(o.shape == s for o in scene))
        return ["how-many", "-", "any", "any", "?"], str(len(scene))
    # relational
    pairs = [(o, di) for o in scene for di in DIRECTIONS if neighbour(scene, o, di) is not None]
    empty = [(o, di) for o in scene for di in DIRECTIONS if neighbour(scene, o, di) is None]
    if not pairs or (empty and rng.random() < d.nothing_rate):
        o, di = rng.choice(empty)
        answer = "nothing"
    else:
        o, di = rng.choice(pairs)
        n = neighbour(scene, o, di)
        answer = n.colour if qtype == "rel_colour" else n.shape
    word = "what-colour" if qtype == "rel_colour" else "what-shape"
    return [word, di, o.colour, o.shape, "?"], answer


def question_text(words: list[str]) -> str:
    """Plain English for a question: ``what colour is the shape left of the red circle?``."""
    kind, di, colour, shape = words[:4]
    if kind == "is-there":
        return f"is there a {colour} {shape}?"
    if kind == "how-many":
        what = "shapes" if shape == "any" else shape + "s"
        return f"how many {'' if colour == 'any' else colour + ' '}{what}?"
    return f"what {kind.split('-')[1]} is the shape {di} of the {colour} {shape}?"


# ---------------------------------------------------------------------------------------- pictures
def scene_tensor(scenes: list[list[Obj]]) -> torch.Tensor:
    """``[B, 8, 6]``: (cy, cx, radius, shape id, r, g, b) … per object slot; radius 0 = empty slot."""
    out = torch.zeros(len(scenes), DIFFICULTIES[3].max_objects, 7)
    for b, scene in enumerate(scenes):
        for k, o in enumerate(scene):
            out[b, k] = torch.tensor([o.cy, o.cx, o.radius, SHAPES.index(o.shape), *RGB[o.colour]])
    return out


def render(objects: torch.Tensor, noise_seed: int | None = None) -> torch.Tensor:
    """Pixel values ``[B, 3, 96, 96]`` (normalised like CLIP inputs) from :func:`scene_tensor`'s
    ``[B, K, 7]``; runs on ``objects``' device, one vectorised pass."""
    device = objects.device
    coords = torch.arange(IMAGE_SIZE, device=device, dtype=torch.float32) + 0.5
    yy, xx = coords[:, None], coords[None, :]
    cy, cx, r, kind = (objects[..., i, None, None] for i in range(4))  # [B, K, 1, 1]
    dy, dx = yy - cy, xx - cx
    circle = dy ** 2 + dx ** 2 <= r ** 2
    square = (dy.abs() <= 0.8 * r) & (dx.abs() <= 0.8 * r)
    triangle = (dy <= 0.8 * r) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.55)
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)) & (r > 0)  # [B, K, H, W]
    img = torch.full((objects.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE), 0.5, device=device)
    for k in range(objects.shape[1]):
        img = torch.where(mask[:, k, None], objects[:, k, 4:, None, None], img)
    if noise_seed is not None:
        gen = torch.Generator(device=device).manual_seed(noise_seed)
        img = img + 0.03 * torch.randn(img.shape, generator=gen, device=device)
    return (img - PIXEL_MEAN) / PIXEL_STD


# ------------------------------------------------------------------------------------------ batches
def make_batch(rng: random.Random, n_images: int, questions_per_image: int = 4, difficulty: int = 3) -> dict:
    """CPU tensors: ``input_ids [N, 150]``, ``objects [n_images, K, 7]`` (render them with
    :func:`render`), ``image_index [N]``, ``answer [N]`` (token ids), ``qtype [N]`` (index in QTYPES).
    ``N = n_images * questions_per_image``; the questions of an image have distinct types where possible."""
    d = DIFFICULTIES[difficulty]
    scenes = [sample_scene(rng, difficulty) for _ in range(n_images)]
    ids, answers, qtypes, image_index = [], [], [], []
    for i, scene in enumerate(scenes):
        types = list(d.qtypes) * math.ceil(questions_per_image / len(d.qtypes))
        rng.shuffle(types)
        for qtype in types[:questions_per_image]:
            words, answer = sample_question(rng, scene, qtype, difficulty)
            ids.append([BOS_TOKEN_ID] + [IMAGE_TOKEN_ID] * NUM_VISUAL_TOKENS + [TOKEN[w] for w in words])
            answers.append(TOKEN[answer])
            qtypes.append(QTYPES.index(qtype))
            image_index.append(i)
    return {"input_ids": torch.tensor(ids), "objects": scene_tensor(scenes), "image_index": torch.tensor(image_index),
            "answer": torch.tensor(answers), "qtype": torch.tensor(qtypes), "scenes": scenes}


def heldout(n: int = 512, difficulty: int = 3, seed: int = HELDOUT_SEED, questions_per_image: int = 4) -> dict:
    """The held-out split: ``n`` questions (``n / questions_per_image`` pictures), fixed by ``seed``.

    Training draws from ``random.Random(seed)`` with seeds below ``10**6`` (see ``batches``), so the
    two never share a stream. Pixel values are rendered here (``pixel_values [N, 3, 96, 96]``,
    one per question, so any slice of the batch is a valid model input)."""
    batch = make_batch(random.Random(seed), math.ceil(n / questions_per_image), questions_per_image, difficulty)
    pixels = render(batch["objects"], noise_seed=seed)
    out = {k: v[:n] for k, v in batch.items() if k not in ("objects", "scenes")}
    out["pixel_values"] = pixels[batch["image_index"][:n]]
    out["scenes"] = batch["scenes"]
    return out


def model_inputs(data: dict, start: int = 0, stop: int | None = None) -> dict:
    """``input_ids`` and ``pixel_values`` of questions ``start:stop`` of a :func:`heldout` split."""
    return {"input_ids": data["input_ids"][start:stop], "pixel_values": data["pixel_values"][start:stop]}
