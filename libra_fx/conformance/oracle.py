"""A generic, hook-based oracle: the contract applied to an eager transformers model with forward
hooks on its language model's decoder layers — a second implementation, independent of the FX passes.

::

    with HookOracle(model, "libra", ratio=0.5, layers=(1, 2)) as oracle:
        logits = model(**inputs).logits              # [B, T', vocab], compressed after layers 1 and 2
        tokens = model.generate(**inputs, do_sample=False, max_new_tokens=8)

This is how hook-based compression tools work (e.g. ModelTC/LightCompress). While it is active:

- the language model runs eager attention, so layer ``L``'s own attention probabilities give the
  importance row (contract §2): the query is the last token, the mean is over heads;
- after stage layer ``L`` a forward hook replaces each span's tokens by the method's selector and
  compressor (the pure functions of :mod:`libra_fx.methods`, tested on their own) and records each
  output token's *source* (contract §3–§5): merged targets take their target's, compensation tokens
  the span's last input position;
- a pre-hook on every later layer slices what that layer receives to the kept tokens: in prefill the
  position ids and RoPE tables (gathered by source), and the mask, rows and columns
  (``M'[q, k] = M[src q, src k]``; of two tokens with one source the earlier does not see the later,
  indexed here, not with ``gather_mask``; a hybrid decoder's linear-attention or convolution layer gets
  a 2-D padding mask: its columns); in decode the mask's columns,
  to the sources of that layer's own (shorter) KV cache. The columns of transformers' decode mask are
  the last ``kv_len`` original positions, so sliding-window layers, whose caches keep only the last
  ``window − 1`` entries, are served by the same rule: the window counts original positions. (Where the
  first full-attention layer comes after a stage — Llama4's are after its chunked ones — transformers
  builds the full-attention mask from that compressed cache: its columns are cache entries, and the
  layer takes the first ``kv_len``, left padding in front, contract §8.)

A span is one image's placeholder tokens, contiguous or not: ``images`` gives the placeholder count of
each image in sequence order (one list for every sample, or one per sample); without it each
contiguous run of placeholders is one image. Text between an image's placeholders (row breaks, tile
markers) is text. Every sample must keep the same count (no empty slots).
"""

from __future__ import annotations

import contextlib

import torch

from libra_fx import families
from libra_fx.methods import get_method, method as method_spec
from libra_fx.methods.selectors import num_targets, per_stage
from libra_fx.runtime import compat


class HookOracle:
    def __init__(self, model, method: str = "libra", ratio: float | tuple[float, ...] = 0.5, layers: tuple[int, ...] = (1,),
                 images: list | None = None, **options):
        self.model, self.ratio, self.stages, self.images = model, ratio, tuple(layers), images
        self.method, self.options = get_method(method), method_spec(method, **options).options
        config = model.config
        self.text_config = getattr(config, "text_config", config)
        self.placeholders = families.placeholder_ids(model)  # its adapter's (FamilyAdapter.placeholder_ids)
        decoder = model.get_decoder()  # (Llama4's is its causal LM, around the decoder)
        self.decoder_layers = (decoder if hasattr(decoder, "layers") else decoder.model).layers
        self.handles = []

    # --- activation ------------------------------------------------------------------------------------------
    def __enter__(self):
        self.eager = contextlib.ExitStack()
        self.eager.enter_context(compat.attention_switched(self.text_config, "eager"))
        self.seqs, self.prefill = None, False
        self.handles.append(self.model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for i, layer in enumerate(self.decoder_layers):
            if self.stages and i > self.stages[0]:
                self.handles.append(layer.register_forward_pre_hook(self._slice_inputs(i), with_kwargs=True))
            if i in self.stages:
                self.handles.append(layer.self_attn.register_forward_hook(self._keep_attention))
                self.handles.append(layer.register_forward_hook(self._compress(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.eager.close()  # the attention it had

    def valid(self) -> torch.Tensor:
        """``[B, T']``: which positions of the last prefill's output are real tokens (not padding)."""
        sources = torch.tensor([[src for src, _, _ in seq] for seq in self.seqs])
        return self.input_mask.gather(1, sources).bool()

    # --- prefill: which tokens there are ------------------------------------------------------------------------
    def _on_call(self, model, args, kwargs):
        cache = _cache(kwargs)
        self.prefill = cache is None or cache.get_seq_length() == 0
        if self.prefill:
            self._start(kwargs["input_ids"], kwargs.get("attention_mask"))

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """One list per sample of ``(source, kind, span)``: kind ``text``, ``visual`` or ``comp``."""
        self.input_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.seqs, self.span_last, self.kv_sources = [], [], {}
        for b, row in enumerate(input_ids.tolist()):
            counts = self.images if not self.images or isinstance(self.images[0], int) else self.images[b]
            ends = [sum(counts[:k + 1]) for k in range(len(counts or ()))]  # each image's last placeholder + 1
            seq, last, span, seen = [], {}, -1, 0
            for j, token in enumerate(row):
                visual = token in self.placeholders
                if visual:
                    if ends:
                        span = next(k for k, end in enumerate(ends) if seen < end)
                    elif not (seq and seq[-1][1] == "visual"):
                        span += 1
                    seen += 1
                    last[span] = j
                seq.append((j, "visual" if visual else "text", span if visual else -1))
            self.seqs.append(seq)
            self.span_last.append(last)

    def _keep_attention(self, module, args, output):
        self.attention = output[1]  # [B, H, T, T] probabilities (eager)

    def _compress(self, index: int):
        def hook(layer, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not self.prefill:
                return None
            new = self._compress_batch(hidden, self._stage_ratio(index))
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _stage_ratio(self, layer: int) -> float:
        return per_stage(self.ratio, len(self.stages))[self.stages.index(layer)]

    def _compress_batch(self, hidden: torch.Tensor, ratio: float) -> torch.Tensor:
        """Per sample and span: its visual tokens compressed, each merged target at its target's place, the
        carried compensation tokens kept, the new ones right after the last of them (or after the span's
        last token); text where it was."""
        rows, seqs = [], []
        for b, seq in enumerate(self.seqs):
            query = max(j for j, (src, _, _) in enumerate(seq) if self.input_mask[b, src])
            alpha = self.attention[b, :, query].float().mean(0)
            members: dict = {}  # span → (its visual tokens, its compensation tokens), as indices into seq
            for j, (_, kind, span) in enumerate(seq):
                if kind != "text":
                    members.setdefault(span, ([], []))[kind == "comp"].append(j)
            merged, new_comps, anchor = {}, {}, {}
            for span, (run, carried) in members.items():
                replaced, targets = self._compress_span(hidden[b, run].float(), alpha[run], ratio)
                nt = len(targets)
                merged.update({run[t]: replaced[k] for k, t in enumerate(targets)})
                new_comps[span] = replaced[nt:]
                anchor[(carried or run)[-1]] = span
            tokens, out = [], []
            for j, (src, kind, span) in enumerate(seq):
                if kind != "visual" or j in merged:
                    tokens.append(merged.get(j, hidden[b, j]))
                    out.append(seq[j])
                if j in anchor:
                    span = anchor[j]
                    tokens += list(new_comps[span])
                    out += [(self.span_last[b][span], "comp", span)] * len(new_comps[span])
            rows.append(torch.stack([t.to(hidden.dtype) for t in tokens]))
            seqs.append(out)
        if len({len(s) for s in seqs}) != 1:
            raise ValueError("the hook oracle needs every sample to keep the same number of tokens")
        self.seqs = seqs
        return torch.stack(rows)

    def _compress_span(self, h: torch.Tensor, alpha: torch.Tensor, ratio: float):
        nt = num_targets(h.shape[0], ratio)
        targets = self.method.selector(alpha[None], h[None], nt, self.options)
        return self.method.compressor(h[None], alpha[None], targets, self.options)[0], targets[0].tolist()

    # --- every later layer: slice what it receives -----------------------------------------------------------
    def _slice_inputs(self, index: int):
        def hook(layer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.seqs is None:
                return None
            sources = torch.tensor([[src for src, _, _ in seq] for seq in self.seqs])
            if self.prefill:
                kwargs = self._prefill_kwargs(kwargs, sources)
                self.kv_sources[index] = self._kept_by_cache(index, sources, kwargs)
            else:
                kwargs = self._decode_kwargs(index, kwargs, hidden.shape[1])
            return args, kwargs

        return hook

    def _prefill_kwargs(self, kwargs: dict, sources: torch.Tensor) -> dict:
        out = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # the padding mask of a linear-attention or convolution layer
            out["attention_mask"] = mask.gather(1, sources)
        elif mask is not None:
            b = torch.arange(mask.shape[0])[:, None, None]
            gathered = mask[b, 0, sources[:, :, None], sources[:, None, :]][:, None]
            t = sources.shape[1]
            tie = torch.ones(t, t, dtype=torch.bool).triu(1) & (sources[:, :, None] == sources[:, None, :])
            out["attention_mask"] = gathered.masked_fill(tie[:, None], False if mask.dtype == torch.bool
                                                         else torch.finfo(mask.dtype).min)
        if kwargs.get("position_ids") is not None:
            ids = kwargs["position_ids"]
            ids = ids.expand(*ids.shape[:-2], sources.shape[0], ids.shape[-1])  # [1, T]: one row for every sample
            out["position_ids"] = ids.gather(-1, sources.expand(*ids.shape[:-2], *sources.shape))
        rope = kwargs.get("position_embeddings")
        if isinstance(rope, torch.Tensor):  # one complex table (Llama4's)
            out["position_embeddings"] = _gather_tokens(rope, sources)
        elif rope is not None:
            out["position_embeddings"] = tuple(_gather_tokens(x, sources) for x in rope)
        return out

    def _kept_by_cache(self, index: int, sources: torch.Tensor, kwargs: dict) -> torch.Tensor:
        cache = _cache(kwargs)
        window = getattr(cache.layers[index], "sliding_window", None) if cache is not None else None
        return sources[:, -(window - 1):] if window else sources

    def _decode_kwargs(self, index: int, kwargs: dict, steps: int) -> dict:
        mask = kwargs.get("attention_mask")
        cache = _cache(kwargs)
        end = cache.get_seq_length()  # original positions so far (the first attention layer, not compressed, holds
        # the new ones already)
        new = torch.arange(end - steps, end).expand(self.kv_sources[index].shape[0], steps)
        wanted = torch.cat([self.kv_sources[index], new], dim=1)
        window = getattr(cache.layers[index], "sliding_window", None)
        self.kv_sources[index] = wanted[:, -(window - 1):] if window else wanted
        if mask is None:
            return kwargs
        if not window and mask.shape[-1] < end:  # built from a compressed layer's cache (the first full-attention
            # layer comes after a stage): its columns are cache entries; left padding stays in front
            return dict(kwargs, attention_mask=mask[..., :wanted.shape[1]])
        column = wanted - (end - mask.shape[-1])  # the mask's columns are the last kv_len positions
        b = torch.arange(mask.shape[0])[:, None, None]
        picked = mask[b, 0, torch.arange(steps)[None, :, None], column.clamp(min=0)[:, None, :]][:, None]
        hidden = column.lt(0)[:, None, None, :]
        blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        return dict(kwargs, attention_mask=picked.masked_fill(hidden, blocked))


def _cache(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _gather_tokens(x: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """``x[..., b, t, :]`` at ``t = sources[b]`` (RoPE tables ``[B, T, d]`` or ``[R, B, T, d]``)."""
    x = x.expand(*x.shape[:-3], sources.shape[0], *x.shape[-2:])
    return x.gather(-2, sources[..., None].expand(*x.shape[:-3], *sources.shape, x.shape[-1]))
