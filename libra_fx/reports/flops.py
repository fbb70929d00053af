"""FLOPs of the visual tokens through the decoder (contract §7, the paper's formula).

Per decoder layer with ``n`` visual tokens, hidden size ``d`` and FFN size ``m``:
``4nd² + 2n²d + 3ndm``. A stage after layer ``L`` changes ``n`` for layers ``L+1..``::

    report(preset("llava-1.5-7b"), method="libra", ratio=0.5)   # 3.82 T → 1.79 T (47 %)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from libra_fx.methods import get_method, is_vision_method, visual_token_counts
from libra_fx.methods.selectors import per_stage

PRESETS = ("llava-1.5-7b", "llava-1.5-13b", "llava-next-8b", "gemma3-4b", "qwen3-vl-8b")


@dataclass(frozen=True)
class DecoderShape:
    """A decoder's published sizes (prefill only: the formula counts the prompt's visual tokens).
    Heads, KV heads and vocabulary are shown, not counted: the formula is the paper's."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    visual_tokens: int
    visual_tokens_note: str  # which count, and why
    layers: tuple[int, ...]  # the paper's libra schedule for this model (quarters of the depth)
    fastv_layers: tuple[int, ...]
    source: str  # where the sizes are published
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    vocab_size: int | None = None


def preset(name: str, visual_tokens: int | None = None) -> DecoderShape:
    """A shipped model shape (``PRESETS``); ``visual_tokens`` overrides the default count."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    data = json.loads(resources.files("libra_fx").joinpath("reports", "presets", f"{name}.json").read_text())
    data["layers"], data["fastv_layers"] = tuple(data["layers"]), tuple(data["fastv_layers"])
    if visual_tokens is not None:
        data["visual_tokens"], data["visual_tokens_note"] = visual_tokens, "given by the caller"
    return DecoderShape(**data)


def kept_tokens(method: str, n: int, ratio: float = 0.0, kept: int | None = None) -> int:
    """Visual tokens per image the decoder sees under a vision-side ``method``.

    ``prumerge_fixed``: its ``num_targets(n, ratio)`` patches plus the extra token (while one is pruned).
    The adaptive methods: ``kept`` when given (a measured image, extra token included), else the
    typical count ``round(typical_kept·n)`` (the paper's: 32 of 576 for PruMerge, 144 for PruMerge+).
    """
    m = get_method(method)
    if m.side != "vision":
        raise ValueError(f"{method} is not a vision-side method")
    if kept is not None:
        if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= n:
            raise ValueError(f"kept must be a token count in [1, {n}], got {kept!r}")
        return kept
    if not m.adaptive:
        return m.capacity(n, ratio)
    return max(1, min(n, int(m.typical_kept * n + 0.5)))


def layer_flops(n: int, d: int, m: int) -> int:
    """``4nd² + 2n²d + 3ndm``: projections, attention scores/values and the gated FFN."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def visual_tokens_per_layer(shape: DecoderShape, method: str = "libra", ratio: float | tuple[float, ...] = 0.0,
                            layers: tuple[int, ...] = (), compensation: bool = True,
                            kept: int | None = None) -> list[int]:
    """Visual tokens each decoder layer sees; ``compensation=False`` leaves compensation tokens out.

    Vision-side methods (``prumerge``, ``prumerge_plus``, ``prumerge_fixed``) compress before layer 0:
    every layer sees :func:`kept_tokens` (``kept``: a measured count, else typical).
    """
    if is_vision_method(method):
        return [kept_tokens(method, shape.visual_tokens, ratio, kept)] * shape.num_hidden_layers
    ratios = per_stage(ratio, len(layers))
    staged = sorted((layer, r) for layer, r in zip(layers, ratios) if layer < shape.num_hidden_layers and r > 0)
    stages = [layer for layer, _ in staged]
    after = visual_token_counts(shape.visual_tokens, tuple(r for _, r in staged), len(stages), method, compensation)
    return [([shape.visual_tokens] + after)[sum(layer > s for s in stages)] for layer in range(shape.num_hidden_layers)]


def total_flops(shape: DecoderShape, **schedule) -> int:
    d, m = shape.hidden_size, shape.intermediate_size
    return sum(layer_flops(n, d, m) for n in visual_tokens_per_layer(shape, **schedule))


def report(shape: DecoderShape, method: str = "libra", ratio: float = 0.5, layers: tuple[int, ...] | None = None,
           compensation: bool = True, kept: int | None = None) -> str:
    """A plain-text table: per-layer visual tokens and FLOPs, total, and ratio to the vanilla model.

    ``kept``: for ``prumerge`` / ``prumerge_plus``, the measured kept count of an image (default: typical).
    """
    if layers is None:
        layers = shape.fastv_layers if method == "fastv" else shape.layers
    d, m = shape.hidden_size, shape.intermediate_size
    counts = visual_tokens_per_layer(shape, method, ratio, tuple(layers), compensation, kept)
    vanilla = total_flops(shape)
    total = sum(layer_flops(n, d, m) for n in counts)
    if is_vision_method(method):
        n = shape.visual_tokens
        fixed = not get_method(method).adaptive
        how = ("measured" if kept is not None else "fixed ratio") if fixed or kept is not None \
            else f"typical: {get_method(method).typical_kept:.1%} of the patches, pass kept= / --kept for a measured image"
        schedule = (f"{method}, {n} → {counts[0]} visual tokens before layer 0 ({how}); libra-fx's graph holds "
                    f"{get_method(method).capacity(n, ratio)} slots per image (padding masked)")
    else:
        schedule = (f"{method}, ratio {ratio}, stages after layers {tuple(layers)}"
                    + ("" if compensation else " (compensation tokens not counted)"))
    heads = (f", {shape.num_attention_heads} heads ({shape.num_key_value_heads} KV), vocabulary {shape.vocab_size}"
             if shape.num_attention_heads else "")
    lines = [f"{shape.name}: d={d}, m={m}, {shape.num_hidden_layers} layers{heads}",
             f"{shape.visual_tokens} visual tokens: {shape.visual_tokens_note}", schedule, "",
             "| layers | visual tokens | TFLOPs per layer |", "| --- | ---: | ---: |"]
    start = 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            span = f"{start}" if i - 1 == start else f"{start}–{i - 1}"
            lines.append(f"| {span} | {counts[start]} | {layer_flops(counts[start], d, m) / 1e12:.4f} |")
            start = i
    lines += ["", f"total: {total / 1e12:.2f} T of {vanilla / 1e12:.2f} T vanilla ({total / vanilla:.0%})"]
    return "\n".join(lines)
