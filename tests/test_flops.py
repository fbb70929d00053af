"""The FLOPs report reproduces the paper's Table 1 (contract §7) within 1 %."""

from __future__ import annotations

import pytest

from libra_fx.reports import flops
from libra_fx.cli import main

# (preset, method, ratio, paper's TFLOPs); libra rows leave compensation tokens out, as the paper does
TABLE_1 = [
    ("llava-1.5-7b", None, 0.0, 3.82),
    ("llava-1.5-7b", "fastv", 0.5, 2.13),
    ("llava-1.5-7b", "libra", 0.5, 1.78),
    ("llava-1.5-7b", "libra", 0.67, 1.41),
    ("llava-1.5-13b", None, 0.0, 7.44),
    ("llava-1.5-13b", "fastv", 0.5, 4.06),
    ("llava-1.5-13b", "libra", 0.5, 3.47),
    ("llava-1.5-13b", "libra", 0.67, 2.74),
]


@pytest.mark.parametrize("name, method, ratio, paper", TABLE_1)
def test_table_1(name, method, ratio, paper):
    shape = flops.preset(name)
    schedule = {} if method is None else dict(
        method=method, ratio=ratio, layers=shape.fastv_layers if method == "fastv" else shape.layers,
        compensation=False)
    assert flops.total_flops(shape, **schedule) / 1e12 == pytest.approx(paper, rel=0.01)


def test_compensation_tokens_counted():
    shape = flops.preset("llava-1.5-7b")
    assert flops.visual_tokens_per_layer(shape, "libra", 0.5, shape.layers)[::8] == [576, 289, 146, 75]
    assert flops.total_flops(shape, method="libra", ratio=0.5, layers=shape.layers) / 1e12 == pytest.approx(1.79, abs=0.005)


def test_layer_formula_by_hand():
    assert flops.layer_flops(2, 3, 5) == 4 * 2 * 9 + 2 * 4 * 3 + 3 * 2 * 3 * 5


def test_cli_prints_the_report(capsys):
    main(["flops", "--preset", "llava-1.5-7b", "--method", "fastv", "--ratio", "0.5"])
    out = capsys.readouterr().out
    assert "| 4–31 | 288 |" in out and "total: 2.13 T of 3.82 T vanilla (56%)" in out


def test_unknown_preset():
    with pytest.raises(ValueError, match="presets: llava-1.5-7b, llava-1.5-13b, llava-next-8b"):
        flops.preset("llava-9b")
