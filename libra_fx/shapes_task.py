"""Shapes-VQA: a synthetic visual question-answering task, and the small LLaVA trained on it.

No LVLM weights and no benchmark data can be downloaded here, so libra-fx makes its own: pictures
of coloured shapes on a grid, questions whose answers need the picture, single-token answers. The
model is an unmodified ``LlavaForConditionalGeneration`` (a small CLIP tower and a Llama decoder);
the trained checkpoint ships with the package (:func:`load_shapes_lvlm`)::

    model = load_shapes_lvlm()
    data = heldout(512)                       # fixed by seed, disjoint from training
    print(accuracy(model, data))              # uncompressed held-out accuracy

The task (``difficulty`` 1–3):

* a ``96×96`` picture, a ``4×4`` grid of cells (24 px, i.e. 3×3 patches of 8 px each), on each
  occupied cell one shape (circle, square, triangle) in one colour (red, green, blue, yellow),
  jittered in size and position inside its cell; every (colour, shape) pair occurs at most once;
* questions (5 tokens each, so every prompt of a batch has the same length):

  - ``is there a red circle ?`` → yes / no;
  - ``how many red shapes ?``, ``how many circles ?``, ``how many shapes ?`` → 0–8;
  - relational (two hops: find the named object, then look at the adjacent cell):
    ``what colour is the shape left of the red circle ?`` → a colour, and
    ``what shape is the shape above the blue square ?`` → a shape, or ``nothing`` when that cell
    is empty (difficulty 3).

The prompt is ``<bos> <image>×144 q0 q1 q2 q3 q4``; the answer is the next token.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
    return (img - 0.45) / 0.27


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


# -------------------------------------------------------------------------------------------- model
def shapes_lvlm_config(num_layers: int = 8, hidden_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2,
                       intermediate_size: int = 384, vision_hidden: int = 64, vision_layers: int = 2,
                       attn: str = "sdpa") -> LlavaConfig:
    """A LLaVA config: a small CLIP tower (patch 8, 144 visual tokens) and a Llama decoder."""
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                              patch_size=PATCH_SIZE, projection_dim=vision_hidden)
    text = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=VOCAB_SIZE,
                       max_position_embeddings=256, pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID,
                       eos_token_id=None)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                       pad_token_id=PAD_TOKEN_ID, vision_feature_layer=-1, attn_implementation=attn)


def checkpoint_path():
    """The shipped checkpoint's folder (``config.json`` + ``model.safetensors``)."""
    return resources.files("libra_fx").joinpath("checkpoints", "shapes-lvlm")


def load_shapes_lvlm(path=None, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    """The trained shapes LLaVA (the shipped checkpoint unless ``path``), fp32, eval mode, run once
    eagerly (transformers installs its output-capturing hooks on the first eager call)."""
    path = str(path or checkpoint_path())
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    with torch.no_grad():
        model(**model_inputs(heldout(1), 0, 1))
    return model


# ------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def answer_logits(model, data: dict, batch_size: int = 128, forward=None) -> torch.Tensor:
    """Last-position logits ``[N, vocab]`` (float32) over the split, in batches of ``batch_size``.

    ``forward`` defaults to ``model``; pass a compiled forward to go through a backend. Batches all
    have ``batch_size`` rows (the split's size must be a multiple) so one compiled graph serves all."""
    forward = forward or model
    n = data["input_ids"].shape[0]
    out = []
    for start in range(0, n, batch_size):
        out.append(forward(**model_inputs(data, start, start + batch_size)).logits[:, -1].float())
    return torch.cat(out)


def accuracy(model, data: dict, batch_size: int = 128, forward=None) -> float:
    logits = answer_logits(model, data, batch_size, forward)
    return (logits.argmax(-1) == data["answer"]).float().mean().item()


def per_type_accuracy(logits: torch.Tensor, data: dict) -> dict[str, float]:
    hit = logits.argmax(-1) == data["answer"]
    return {q: hit[data["qtype"] == i].float().mean().item() for i, q in enumerate(QTYPES) if (data["qtype"] == i).any()}


def drop_visual_after(model, layer: int):
    """A context manager: decoder layers after ``layer`` cannot attend to any visual token.

    Exactly what removing every visual token after ``layer`` does to the text tokens' outputs
    (visual rows still attend among themselves, but nothing reads them). Eager, sdpa or eager
    attention, no padding. Used to measure the model's *visual dependence* per layer."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        handles = []
        state = {}

        def capture(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None:
                state["visual"] = ids == IMAGE_TOKEN_ID
            return None

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            visual = state["visual"]  # [B, T]
            b, t = visual.shape
            if hidden.shape[1] != t:  # decode step: leave it
                return None
            causal = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril()
            allow = causal[None] & ~(visual[:, None, :] & ~visual[:, :, None])  # text rows never see visual keys
            if model.config.text_config._attn_implementation == "eager":
                mask = torch.zeros(allow.shape, dtype=hidden.dtype, device=hidden.device)
                mask = mask.masked_fill(~allow, torch.finfo(hidden.dtype).min)[:, None]
            else:
                mask = allow[:, None]
            kwargs["attention_mask"] = mask
            return args, kwargs

        lm = model.model.language_model
        handles.append(model.register_forward_pre_hook(capture, with_kwargs=True))
        for i, decoder_layer in enumerate(lm.layers):
            if i > layer:
                handles.append(decoder_layer.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    return ctx()


def visual_dependence(model, data: dict, batch_size: int = 128) -> dict[int, float]:
    """Held-out accuracy when every visual token is dropped after layer ``L``, for each ``L``
    (``-1``: no visual token at all). A model whose accuracy barely falls after the compression
    layer cannot rank decoder-side compression methods."""
    out = {}
    for layer in range(-1, model.config.text_config.num_hidden_layers):
        with drop_visual_after(model, layer):
            out[layer] = accuracy(model, data, batch_size)
    return out


# ----------------------------------------------------------------------------------------- training
def batches(seed: int, n_images: int, questions_per_image: int, difficulty: int):
    """An endless stream of :func:`make_batch` batches; ``seed < 10**6`` (held-out seeds are larger)."""
    assert 0 <= seed < 10**6
    rng = random.Random(seed)
    while True:
        yield make_batch(rng, n_images, questions_per_image, difficulty)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, seed, n_images, questions_per_image, difficulty):
        super().__init__()
        self.args = (seed, n_images, questions_per_image, difficulty)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed, *rest = self.args
        seed = seed * 97 + (info.id if info else 0)
        for batch in batches(seed % 10**6, *rest):
            batch.pop("scenes")
            yield batch


def train(model=None, steps: int = 2000, images_per_batch: int = 64, questions_per_image: int = 4,
          lr: float = 6e-4, warmup: int = 200, difficulty: int = 3, seed: int = 0, device: str = "cpu",
          workers: int = 0, eval_every: int = 0, eval_data: dict | None = None, progress: bool = True,
          amp: bool = False, minutes: float | None = None,
          log=print) -> tuple[LlavaForConditionalGeneration, list[dict]]:
    """Train (from scratch unless ``model``) with AdamW, warm-up + cosine, cross-entropy on the
    answer token. Returns the model (eval mode, on the CPU) and a log of ``{step, loss, acc?, s}``.

    ``minutes``: time steps 21–70, then set ``steps`` so that the run takes about that long
    (the cosine schedule follows the new length)."""
    import time
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = model or LlavaForConditionalGeneration(shapes_lvlm_config())
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    total = {"steps": steps}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total["steps"], 1.0))))
    loader = torch.utils.data.DataLoader(_Stream(seed, images_per_batch, questions_per_image, difficulty),
                                         batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                                         persistent_workers=bool(workers))
    history, running = [], None
    bar = tqdm(total=steps, disable=not progress, mininterval=2.0, desc="train")
    it = iter(loader)
    started, step = time.perf_counter(), 0
    while step < total["steps"]:
        step += 1
        if minutes and step == 21:
            mark = time.perf_counter()
        if minutes and step == 71:
            now = time.perf_counter()
            per_step = (now - mark) / 50
            total["steps"] = max(71, 71 + int((minutes * 60 - (now - started)) / per_step))
            bar.total = total["steps"]
            log(f"{per_step * 1e3:.0f} ms/step: training for {total['steps']} steps")
        batch = next(it)
        pixels = render(batch["objects"].to(device), noise_seed=None)
        pixels = pixels + 0.03 / 0.27 * torch.randn_like(pixels)
        pixels = pixels[batch["image_index"].to(device)]
        ids, answer = batch["input_ids"].to(device), batch["answer"].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits.float(), answer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        entry = {"step": step, "loss": running, "s": round(time.perf_counter() - started, 1)}
        if eval_every and eval_data is not None and (step % eval_every == 0 or step == total["steps"]):
            model.eval()
            data = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in eval_data.items()}
            entry["acc"] = accuracy(model, data, batch_size=256)
            model.train()
            log(f"step {step}: loss {running:.4f}, held-out accuracy {entry['acc']:.3f}")
        history.append(entry)
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    return model.eval().cpu(), history
