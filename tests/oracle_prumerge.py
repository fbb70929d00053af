"""Independent, slow, eager reference for the vision-side methods (PruMerge, PruMerge+, fixed).

A port of the public reference, 42Shawn/LLaVA-PruMerge ``llava/model/multimodal_encoder/clip_encoder.py``
(``token_prune_merge_advanced`` and ``token_prune_merge_advanced_plus``), one image at a time with
plain loops, plus contract §6's documented departures. It imports nothing from ``libra_fx`` and reuses
only the decoder-driving helpers of ``tests/oracle.py`` (masks, KV, one decode step).

Per image, as the reference does: forward hooks on the tower's last layer's ``q_proj``/``k_proj``
give ``q``, ``k`` at full width ``C``; ``attn = softmax(q·kᵀ·C^-½)``, ``cls_attn = attn[0, 1:]``;
the IQR share ``np.percentile`` 25/75 → ``ratio``; ``topk(cls_attn, int(N·ratio))`` (descending);
PruMerge+ appends ``arange(0, N−1, int(int(1/ratio)/3))`` minus the kept; each kept token becomes
``x_i + Σ_{32 nearest by F.normalize(k) cosine} a_j·x_j`` over the other patches; one extra token
``Σ_{others} a_j·x_j``; then the projector. ``x`` is the tower feature LLaVA feeds the projector.

Departures (contract §6, decisions): the IQR runs per image (the reference flattens the batch);
an image without outliers keeps its most attended patch (the reference keeps none); ties go to
the lower patch index; ``prumerge_fixed`` keeps ``Nt = num_targets(N, ratio)``; the extra token
exists only while some patch is pruned; ``order="spatial"`` sorts the kept tokens by patch index;
``positions="original"`` gives each kept patch its own position id (the extra token the span's last).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from oracle import _build_mask, _decode_layer, _input_positions, _layer_kv, _Tok, num_targets

K_NEIGHBOURS = 32


# --------------------------------------------------------------------------------------------
# The reference's token maths, one image at a time
# --------------------------------------------------------------------------------------------


def outlier_ratio(cls_attn: torch.Tensor) -> float:
    """The reference's ``outlier_dectection``: the share of values above ``Q3 + 1.5·IQR`` (NumPy)."""
    attn_np = cls_attn.to(dtype=torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(attn_np, 25), np.percentile(attn_np, 75)
    upper_bound = q3 + 1.5 * (q3 - q1)
    return len(np.where(attn_np > upper_bound)[0]) / len(attn_np)


def _descending(cls_attn: torch.Tensor, count: int) -> list[int]:
    """``topk(cls_attn, count)`` in the reference's (descending) order, lower index on ties."""
    values = cls_attn.tolist()
    return sorted(range(len(values)), key=lambda j: (-values[j], j))[:count]


def select(method: str, cls_attn: torch.Tensor, ratio: float) -> list[int]:
    """The kept patches in the reference's order: top-k by descending attention, then PruMerge+'s samples."""
    n = cls_attn.shape[0]
    if method == "prumerge_fixed":
        return _descending(cls_attn, num_targets(n, ratio))
    if method not in ("prumerge", "prumerge_plus"):
        raise ValueError(method)
    reduction_ratio = outlier_ratio(cls_attn)
    left = int(n * reduction_ratio) or 1  # (decision) none above the fence: keep the most attended
    idx = _descending(cls_attn, left)
    if method == "prumerge_plus":
        step_length = int(1 / (left / n))  # the reference's int(1/reduction_ratio)
        stride = int(step_length / 3)
        samples = list(range(0, n - 1, stride)) if stride else []
        idx += [x for x in samples if x not in idx]
    return idx


def merge(x: torch.Tensor, k: torch.Tensor, cls_attn: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
    """The reference's cluster update for each kept token, and the extra token (if any patch is pruned).

    ``x [N, D]`` features, ``k [N, C]`` patch keys, ``cls_attn [N]``; float32.
    """
    n = x.shape[0]
    x, attn = x.float(), cls_attn.float()
    key_norm = F.normalize(k.float(), p=2, dim=-1)
    out = []
    for i in idx:
        rest = [j for j in range(n) if j != i]
        sims = (key_norm[rest] @ key_norm[i]).tolist()
        cluster = [rest[m] for m in sorted(range(len(rest)), key=lambda m: (-sims[m], rest[m]))[:K_NEIGHBOURS]]
        weighted = torch.zeros(x.shape[-1])
        for j in cluster:
            weighted = weighted + attn[j] * x[j]
        out.append(weighted + x[i])
    pruned = [j for j in range(n) if j not in idx]
    if pruned:
        extra = torch.zeros(x.shape[-1])
        for j in pruned:
            extra = extra + attn[j] * x[j]
        out.append(extra)
    return out


def tower_inputs(model, pixel_values: torch.Tensor):
    """``(cls_attn [S, N], patch keys [S, N, C], features [S, N, Dv])`` as the reference hooks them."""
    tower = model.model.vision_tower
    attn_module = tower.encoder.layers[-1].self_attn
    captured = {}
    hooks = [attn_module.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
             attn_module.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o))]
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    q, k = captured["q"].float(), captured["k"].float()
    features = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    width = features.shape[-1]
    attn = torch.softmax((q @ k.transpose(-2, -1)) * width**-0.5, dim=-1)
    return attn[:, 0, 1:], k[:, 1:], features


def image_slots(model, pixel_values, method, ratio, order="attention"):
    """Per image: ``(kept patches in the layout's order, slot features [C, Dv] before the projector)``."""
    cls_attn, keys, features = tower_inputs(model, pixel_values)
    result = []
    for img in range(cls_attn.shape[0]):
        idx = select(method, cls_attn[img], ratio)
        if order == "spatial":
            idx = sorted(idx)
        result.append((idx, torch.stack(merge(features[img], keys[img], cls_attn[img], idx))))
    return result


# --------------------------------------------------------------------------------------------
# Driving the language model, one sample at a time
# --------------------------------------------------------------------------------------------


def _compressed_sample(model, ids, mask_row, pos_row, images, layout):
    """Token records and input embeddings ``[1, T_b, D]`` of one compressed sample; ``images``: the
    remaining images' ``(kept, slots)``, consumed in sequence order."""
    order, positions, convention = layout
    image_id = model.config.image_token_id
    embeds = model.get_input_embeddings()(ids[None])[0]
    toks, rows, t = [], [], 0
    while t < len(ids):
        if int(ids[t]) != image_id:
            toks.append(_Tok("text", int(pos_row[t]), bool(mask_row[t])))
            rows.append(embeds[t])
            t += 1
            continue
        start = t
        while t < len(ids) and int(ids[t]) == image_id:
            t += 1
        kept, slots = images.pop(0)
        with torch.no_grad():
            projected = model.model.multi_modal_projector(slots.to(embeds.dtype))
        own = [start + j for j in kept] + [t - 1] * (len(slots) - len(kept))  # the extra token: the span's last
        for at, row in zip(own, projected):
            toks.append(_Tok("vis", int(pos_row[at]), True))
            rows.append(row)
    if positions == "repacked":  # the compressed sequence numbered as the model numbers an input
        fresh = _input_positions(torch.zeros(1, len(toks), dtype=torch.long),
                                 torch.tensor([[int(tok.valid) for tok in toks]]), convention)[0]
        for tok, p in zip(toks, fresh.tolist()):
            tok.pos = p
    return toks, torch.stack(rows)[None]


def _prefill(model, toks, hidden, kv=None):
    lm = model.model.language_model
    with torch.no_grad():
        mask = _build_mask([toks], hidden.dtype)
        pos = torch.tensor([[t.pos for t in toks]], dtype=torch.long)
        for layer in lm.layers:
            cos, sin = lm.rotary_emb(hidden, pos)
            if kv is not None:
                k_states, v_states = _layer_kv(layer, hidden, cos, sin)
                kv.append([k_states, v_states, torch.tensor([[t.valid for t in toks]])])
            out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin),
                        past_key_values=None, use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out
        return model.lm_head(lm.norm(hidden)[:, -1]).float()


def _samples(model, input_ids, pixel_values, attention_mask, method, ratio, order, positions, convention):
    """Each sample's ``(toks, embeddings, kept counts)``; kept counts include the extra token."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    images = image_slots(model, pixel_values, method, ratio, order)  # images in sample order, spans in sequence order
    pos = _input_positions(input_ids, attention_mask, convention)
    per_sample = len(images) // input_ids.shape[0]
    for b in range(input_ids.shape[0]):
        mine = images[b * per_sample:(b + 1) * per_sample]
        toks, hidden = _compressed_sample(model, input_ids[b], attention_mask[b], pos[b], list(mine),
                                          (order, positions, convention))
        yield toks, hidden, [len(slots) for _, slots in mine]


def prumerge_oracle_logits(model, input_ids, pixel_values, attention_mask=None, *, method="prumerge", ratio=0.5,
                           order="attention", positions="repacked"):
    """``(last-position logits [B, V] float32, tokens per image)``; input positions ``arange(T)``."""
    logits, counts = [], []
    for toks, hidden, kept in _samples(model, input_ids, pixel_values, attention_mask, method, ratio, order,
                                       positions, "arange"):
        logits.append(_prefill(model, toks, hidden)[0])
        counts += kept
    return torch.stack(logits), counts


def prumerge_oracle_generate(model, input_ids, pixel_values, attention_mask=None, *, method="prumerge", ratio=0.5,
                             order="attention", positions="repacked", max_new_tokens=8):
    """Greedy generation, each sample alone: ``(tokens [B, n], per-step logits list of [B, V], tokens per image)``.

    Prefill positions follow ``generate`` (``attention_mask.cumsum − 1``); decode step ``t`` has position
    ``last prompt position + 1 + t`` and attends to the cache of the compressed prompt plus new tokens.
    """
    lm = model.model.language_model
    tokens, steps, counts = [], [], []
    for toks, hidden, kept in _samples(model, input_ids, pixel_values, attention_mask, method, ratio, order,
                                       positions, "generate"):
        counts += kept
        caches: list = []
        logits = _prefill(model, toks, hidden, kv=caches)
        sample_steps, sample_tokens = [logits[0]], []
        with torch.no_grad():
            tok = torch.argmax(logits, dim=-1)
            sample_tokens.append(tok[0])
            for t in range(max_new_tokens - 1):
                h = model.get_input_embeddings()(tok[:, None])
                position = torch.tensor([[toks[-1].pos + 1 + t]])
                cos, sin = lm.rotary_emb(h, position)
                for layer, cache in zip(lm.layers, caches):
                    h = _decode_layer(layer, h, cos, sin, cache)
                step = model.lm_head(lm.norm(h)[:, -1]).float()
                sample_steps.append(step[0])
                tok = torch.argmax(step, dim=-1)
                sample_tokens.append(tok[0])
        tokens.append(torch.stack(sample_tokens))
        steps.append(torch.stack(sample_steps))
    steps_t = torch.stack(steps)  # [B, n, V]
    return torch.stack(tokens).long(), [steps_t[:, i] for i in range(steps_t.shape[1])], counts
