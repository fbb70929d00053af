"""Train the shapes-VQA LLaVA (``libra_fx.shapes_task``) and save it with ``save_pretrained``.

::

    python benchmarks/train_shapes_lvlm.py --device cuda --minutes 6 --out libra_fx/checkpoints/shapes-lvlm
    python benchmarks/train_shapes_lvlm.py --steps 20 --images 8 --out /tmp/smoke   # a smoke run

Writes ``config.json`` + ``model.safetensors`` (fp32), the processor (``shapes_processor``), ``training.json`` (the loss / accuracy curve,
the settings) and, unless ``--no-dependence``, the visual dependence per layer on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from libra_fx import shapes_task as st
from libra_fx.shapes_task.processor import shapes_processor


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=None, help="train for about this long instead of --steps")
    p.add_argument("--images", type=int, default=64, help="pictures per batch (4 questions each)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--difficulty", type=int, default=3, choices=sorted(st.DIFFICULTIES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=1024)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from this checkpoint (its config wins over --layers etc.)")
    p.add_argument("--no-dependence", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    config = st.shapes_lvlm_config(num_layers=args.layers, hidden_size=args.hidden,
                                   intermediate_size=3 * args.hidden, vision_layers=args.vision_layers)
    torch.manual_seed(args.seed)
    model = (st.LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32) if args.init
             else st.LlavaForConditionalGeneration(config))
    n_params = sum(p.numel() for p in model.parameters())
    text, vision = model.config.text_config, model.config.vision_config
    print(f"LLaVA: {text.num_hidden_layers} decoder layers, hidden {text.hidden_size}, "
          f"{vision.num_hidden_layers}-layer CLIP, "
          f"{n_params / 1e6:.2f} M parameters; difficulty {args.difficulty}", flush=True)
    data = st.heldout(args.eval_n, args.difficulty)
    started = time.perf_counter()
    model, history = st.train(model, steps=args.steps, images_per_batch=args.images, lr=args.lr, warmup=args.warmup,
                              difficulty=args.difficulty, seed=args.seed, device=args.device, workers=args.workers,
                              eval_every=args.eval_every, eval_data=data, progress=not args.quiet, amp=args.amp,
                              minutes=args.minutes, log=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    shapes_processor().save_pretrained(args.out)  # tokenizer + image processor: AutoProcessor, lmms-eval
    result = {"settings": vars(args), "parameters": n_params, "train_seconds": round(seconds, 1),
              "steps": len(history), "device": args.device,
              "curve": [h for h in history if "acc" in h or h["step"] % 100 == 0]}
    model.to(args.device)
    dev = {k: (v.to(args.device) if torch.is_tensor(v) else v) for k, v in data.items()}
    logits = st.answer_logits(model, dev, 256)
    result["heldout_accuracy"] = (logits.argmax(-1) == dev["answer"]).float().mean().item()
    result["per_type"] = st.per_type_accuracy(logits.cpu(), data)
    if not args.no_dependence:
        result["visual_dependence"] = st.visual_dependence(model, dev, 256)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1), flush=True)
    return result


if __name__ == "__main__":
    main()
