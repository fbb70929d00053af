"""The shapes LLaVA: its config, the shipped checkpoint, metrics, visual dependence and training."""

from __future__ import annotations

import math
import random
from importlib import resources

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from libra_fx.runtime import compat
from libra_fx.shapes_task.data import (BOS_TOKEN_ID, IMAGE_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID, PATCH_SIZE, QTYPES,
                                       VOCAB_SIZE, heldout, make_batch, model_inputs, render)


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
            if compat.attn_implementation(model.config.text_config) == "eager":
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
