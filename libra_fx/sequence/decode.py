"""What a decode step on a compressed KV cache needs, built from what the compressed prefill returned.

After compression the layers past a stage cache fewer keys than those before it, but transformers
builds one decode mask, as long as layer 0's cache. Two layouts need more than that mask:

* **Empty slots** (samples of one batch with different visual-token counts, contract §1): the
  prefill graph returns ``empty_slots [num_layers, B]`` (:func:`empty_slots_per_layer`), the slots
  in front of each sample in each layer's cache; each decode step gets it as ``libra_empty_slots``,
  by which :mod:`libra_fx.sequence.attention` shifts the mask::

      stages after layers (1, 3) put [2, 0] and [1, 0] in front  →  [[0,0], [0,0], [2,0], [2,0], [3,0], …]

* **Padding slots** (vision-side stages): the prefill returns ``(source, valid, positions)``; each
  decode step gets a 2-D mask of the compressed prompt plus its new tokens, and position ids that
  continue the prompt's: the original prompt's, shifted by what re-packed positions saved
  (:func:`position_shift`).
"""

from __future__ import annotations

import torch


def empty_slots_per_layer(*sources: torch.Tensor, layers: tuple[int, ...], num_layers: int) -> torch.Tensor:
    """``[num_layers, B]``: the empty slots (``source = -1``) in front of each sample in each layer's
    cache, from the source indices of the stages after ``layers`` (called from the graph)."""
    counts = torch.stack([(source < 0).sum(-1) for source in sources])  # [stages, B]
    after = torch.tensor([[layer > stage for stage in layers] for layer in range(num_layers)],
                         dtype=counts.dtype, device=counts.device)  # [num_layers, stages]
    return after @ counts


def position_shift(positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """``[B]``: how far the compressed prompt's last position id lies before the original prompt's.

    ``positions [B, T']`` is the input index whose position id each token took; the last token's is
    ``prompt_len − 1`` unless positions were re-packed, and position ids rise by one per input token
    after the left padding, so the difference of indices is the difference of position ids.
    """
    return positions[:, -1] - (prompt_len - 1)


def compressed_prompt_kwargs(kwargs: dict, prompt_len: int, keep: torch.Tensor, cached: int,
                             shift: torch.Tensor | None = None) -> dict:
    """The 2-D mask and position ids of a step on a cache holding ``cached`` entries, the first
    ``keep.shape[1]`` of which are a compressed prompt (``keep``: ``False`` on padding). Position ids:
    the given ones (or, when absent, those continuing the original prompt), plus ``shift [B]``
    (:func:`position_shift`)."""
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    q = ids.shape[1]
    new = cached - keep.shape[1]  # tokens generated after the prompt and already cached
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("libra_fx: decoding on a PruMerge-compressed cache needs a 2-D attention_mask")
    tail = mask[:, prompt_len:] if mask is not None else keep.new_ones(keep.shape[0], new + q)
    if tail.shape[1] != new + q:
        raise ValueError(
            f"libra_fx: the attention_mask ({mask.shape[1]} columns) does not continue the compressed prompt "
            f"({prompt_len} tokens, {new} generated since, {q} new)"
        )
    out = dict(kwargs)
    out["attention_mask"] = torch.cat([keep.to(tail.dtype), tail], dim=1)
    if kwargs.get("position_ids") is None:
        if mask is not None:
            out["position_ids"] = mask.long().cumsum(-1)[:, -q:] - 1
        else:
            out["position_ids"] = torch.arange(prompt_len + new, prompt_len + new + q, device=keep.device)[None]
    if shift is not None:
        out["position_ids"] = out["position_ids"] + shift[:, None]
    return out
