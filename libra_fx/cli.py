"""The ``libra-fx`` command line tool.

    libra-fx flops --preset llava-1.5-7b --method libra --ratio 0.5
"""

from __future__ import annotations

import argparse

from libra_fx import flops
from libra_fx.methods import METHODS


def _layers(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="libra-fx", description="Visual-token compression tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("flops", help="FLOPs of the visual tokens (SPEC §7) for a model shape and schedule")
    report.add_argument("--preset", choices=flops.PRESETS, default="llava-1.5-7b")
    report.add_argument("--visual-tokens", type=int, help="override the preset's visual-token count")
    report.add_argument("--method", choices=list(METHODS), default="libra")
    report.add_argument("--ratio", type=float, default=0.5)
    report.add_argument("--layers", type=_layers, help="stage layers, e.g. 7,15,23 (default: the paper's for the preset)")
    report.add_argument("--no-compensation", action="store_true", help="leave compensation tokens out of the count")
    args = parser.parse_args(argv)
    shape = flops.preset(args.preset, args.visual_tokens)
    print(flops.report(shape, args.method, args.ratio, args.layers, compensation=not args.no_compensation))


if __name__ == "__main__":
    main()
