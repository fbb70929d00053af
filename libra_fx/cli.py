"""The ``libra-fx`` command line tool.

    libra-fx flops --preset llava-1.5-7b --method libra --ratio 0.5
    libra-fx diff --model tiny-llava --method libra --ratio 0.5 [--out diff.html]
    libra-fx show --model tiny-llava --method libra --ratio 0.5 --out map.png
    libra-fx families [--markdown] [--only glm4v internvl] [--no-verify]
    libra-fx lmms-task --out DIR [--n 16]      (the [eval] extra: lmms-eval and datasets)
"""

from __future__ import annotations

import argparse

import libra_fx
from libra_fx.reports import flops
from libra_fx.methods import METHODS, VISION_METHODS


def _layers(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="libra-fx", description="Visual-token compression tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("flops", help="FLOPs of the visual tokens (contract §7) for a model shape and schedule")
    report.add_argument("--preset", choices=flops.PRESETS, default="llava-1.5-7b")
    report.add_argument("--visual-tokens", type=int, help="override the preset's visual-token count")
    report.add_argument("--method", choices=list(METHODS), default="libra")
    report.add_argument("--ratio", type=float, default=0.5)
    report.add_argument("--layers", type=_layers, help="stage layers, e.g. 7,15,23 (default: the paper's for the preset)")
    report.add_argument("--no-compensation", action="store_true", help="leave compensation tokens out of the count")
    report.add_argument("--kept", type=int, help="prumerge / prumerge_plus: the kept tokens of a measured image "
                        "(default: the typical count)")
    for name, helptext in (("diff", "the graph before and after the passes, by decoder layer"),
                           ("show", "a PNG of which image patches each stage kept, merged or dropped "
                                    "(Pillow: the [viz] extra)")):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--model", choices=["tiny-llava"], default="tiny-llava",
                         help="a built-in random-weight model (4 layers, 36 visual tokens)")
        sub.add_argument("--method", choices=list(METHODS), default="libra")
        sub.add_argument("--ratio", type=float, default=0.5)
        sub.add_argument("--layers", type=_layers, default=(1, 2), help="stage layers, e.g. 1,2")
        sub.add_argument("--out", help="write here (diff: .html for the page, else text; show: the PNG)")
    table = commands.add_parser("families", help="every image-text-to-text class of the installed transformers: "
                                "verified on tiny models against the oracle, refused (why), or not built (why)")
    table.add_argument("--markdown", action="store_true", help="print the table of docs/models.md")
    table.add_argument("--only", nargs="+", default=(), metavar="MODEL_TYPE", help="these model types only")
    table.add_argument("--no-verify", action="store_true", help="list without running the checks (fast)")
    task = commands.add_parser("lmms-task", help="write the shapes-VQA task for lmms-eval (parquet + YAML; "
                               "needs the [eval] extra)")
    task.add_argument("--out", required=True, help="folder for shapes_vqa.parquet and shapes_vqa.yaml")
    task.add_argument("--n", type=int, default=16, help="held-out questions (the first n of shapes_task.heldout(n))")
    args = parser.parse_args(argv)
    if args.command == "lmms-task":
        from libra_fx.lmms_eval.shapes_task import write_task

        print(f"wrote {write_task(args.out, args.n)}: lmms-eval --include_path {args.out} --tasks shapes_vqa ...")
    elif args.command == "families":
        _families(args)
    elif args.command == "flops":
        shape = flops.preset(args.preset, args.visual_tokens)
        print(flops.report(shape, args.method, args.ratio, args.layers, compensation=not args.no_compensation,
                           kept=args.kept))
    elif args.command == "diff":
        _write(args.out, _diff(args))
    else:
        _show(args)


def _tiny_model_and_inputs():
    from libra_fx.testing import synthetic_image, tiny_llava, tiny_llava_inputs

    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    inputs["pixel_values"] = synthetic_image(model.config.vision_config.image_size)[None]
    return model, inputs


def _diff(args) -> str:
    import torch

    from libra_fx.reports.diff import diff

    model, inputs = _tiny_model_and_inputs()
    be = libra_fx.backend(args.ratio, args.layers, args.method, strict=True, compiler="eager")
    with torch.no_grad():
        torch.compile(model.forward, backend=be, fullgraph=True)(**inputs)
    result = diff(be.last)
    return result.html() if args.out and args.out.endswith(".html") else result.text()


def _show(args) -> None:
    from libra_fx.reports.token_map import render, token_map, write_png

    model, inputs = _tiny_model_and_inputs()
    tmap = token_map(model, inputs, args.method, args.ratio, args.layers)
    out = args.out or f"token_map_{args.method}.png"
    write_png(out, render(tmap, inputs["pixel_values"][0]))
    if args.method in VISION_METHODS:
        print(f"{args.method}: kept {int(tmap.targets[0].sum())} of {tmap.grid ** 2} patches")
    print(f"wrote {out}")


def _families(args) -> None:
    from libra_fx.conformance import table
    from libra_fx.runtime.compat import quiet_dynamo_logs

    quiet_dynamo_logs()

    def report(row, result):
        if not args.markdown:
            print(f"{row.model_type}: {row.status} ({len(result.checks)} checks, {result.seconds:.0f} s)", flush=True)
            for check in result.checks:
                print(f"    {'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}", flush=True)

    rows = table.rows(verify=not args.no_verify, only=tuple(args.only), report=report)
    print(table.markdown(rows) if args.markdown else table.text(rows), end="")


def _write(path: str | None, text: str) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
