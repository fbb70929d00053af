"""How many visual tokens the decoder layers actually saw, measured on the model's KV cache.

A forward hook on the model reads, after every prefill (a call whose tokens hold image or video
placeholders, the ids its family adapter names: ``FamilyAdapter.placeholder_ids``), the prompt's
placeholders and the length of chosen layers' KV caches: a layer's cache holds what that layer
attended over, so ``cache length − text tokens`` is the visual tokens it saw, compressed or not.
Sums are kept (``sums``), so counts of several processes add up::

    counter = VisualTokenCounter(model, layers=(0, 8, 16, 24))
    model.generate(...)
    counter.means()   # {'libra_prefills': 1.0, 'libra_visual_tokens_prompt': 576.0,
                      #  'libra_visual_tokens_layer_0': 576.0, 'libra_visual_tokens_layer_8': 289.0, ...}

With a batch, the counts are the longest row's (rows are padded to it).
"""

from __future__ import annotations

from collections import Counter

import torch

from libra_fx import families
from libra_fx.runtime.compat import prompt_tokens, returned_cache


class VisualTokenCounter:
    """Counts visual tokens at ``layers`` on every prefill of ``model`` (see the module docstring)."""

    def __init__(self, model, layers: tuple[int, ...]):
        self.placeholders = torch.tensor(sorted(families.placeholder_ids(model)), dtype=torch.long)  # its adapter's
        if not len(self.placeholders):
            raise ValueError(f"{type(model).__name__}'s config names no image or video placeholder token")
        self.layers = layers
        self.sums: Counter = Counter()
        self.handle = model.register_forward_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs, output) -> None:
        ids, cache = prompt_tokens(args, kwargs), returned_cache(output)
        if ids is None or ids.dtype != torch.long or cache is None:
            return
        visual = int(torch.isin(ids, self.placeholders.to(ids.device)).sum(-1).max())
        if visual == 0:  # a decode step, or a prompt without pictures
            return
        text = ids.shape[1] - visual
        self.sums["libra_prefills"] += 1
        self.sums["libra_visual_tokens_prompt"] += visual
        for layer in self.layers:
            self.sums[f"libra_visual_tokens_layer_{layer}"] += cache.get_seq_length(layer) - text

    def means(self) -> dict[str, float]:
        """``libra_prefills`` and the mean visual tokens per prefill, in the prompt and at each layer."""
        prefills = self.sums["libra_prefills"]
        return {key: float(value if key == "libra_prefills" else value / max(prefills, 1))
                for key, value in self.sums.items()}

    def reset(self) -> None:
        self.sums = Counter()
