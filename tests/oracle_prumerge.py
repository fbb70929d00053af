"""Independent, slow, eager reference for the vision-side methods (PruMerge, PruMerge+, fixed).

Written from the README contract ("PruMerge and PruMerge+ (vision-side methods)") without the
library's token maths: plain Python loops over images, patches and neighbours. It reuses only the
decoder-driving helpers of ``tests/oracle.py`` (masks, KV, one decode step), which know nothing
of PruMerge.

Per image: the vision tower is run with ``output_hidden_states``; its *last* encoder layer's
q/k projections of that layer's input (``hidden_states[-2]`` after ``layer_norm1``) give
``a = mean_h softmax(q_cls·Kᵀ/sqrt(d))[1:]`` and the patch keys (all heads concatenated); the
projected image features are ``get_image_features(...)``. Each sample is then run on its own
(its compressed length is its own), through every decoder layer by hand.
"""

from __future__ import annotations

import math

import torch
from oracle import _build_mask, _decode_layer, _input_positions, _layer_kv, _Tok, cosine, num_targets

K_NEIGHBOURS = 32


# --------------------------------------------------------------------------------------------
# Token maths, one image at a time
# --------------------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the sorted values around position ``q·(n−1)`` (NumPy/torch
    ``linear``, with their numerically symmetric two-sided form), in float32."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    t = torch.tensor(pos - lo, dtype=torch.float32)
    a, b = torch.tensor(v[lo], dtype=torch.float32), torch.tensor(v[hi], dtype=torch.float32)
    return float(a + (b - a) * t) if float(t) < 0.5 else float(b - (b - a) * (1 - t))


def select_iqr(a: list[float]) -> list[int]:
    q1, q3 = _quantile(a, 0.25), _quantile(a, 0.75)
    q1, q3 = torch.tensor(q1, dtype=torch.float32), torch.tensor(q3, dtype=torch.float32)
    bound = float(q3 + 1.5 * (q3 - q1))
    kept = [j for j, x in enumerate(a) if x > bound]
    if not kept:
        kept = [max(range(len(a)), key=lambda j: (a[j], -j))]  # the most attended, first on ties
    return kept


def select_plus(a: list[float]) -> list[int]:
    n = len(a)
    kept = select_iqr(a)
    target = max(1, min(n, (n + 2) // 4))  # round-half-up of n/4
    if len(kept) < target:
        stride = math.ceil(n / (target - len(kept)))  # at most target − k samples
        kept = sorted(set(kept) | set(range(0, n, stride)))
    return kept


def select_fixed(a: list[float], ratio: float) -> list[int]:
    nt = num_targets(len(a), ratio)
    return sorted(sorted(range(len(a)), key=lambda j: (-a[j], j))[:nt])


def select(method: str, a: list[float], ratio: float) -> list[int]:
    if method == "prumerge":
        return select_iqr(a)
    if method == "prumerge_plus":
        return select_plus(a)
    if method == "prumerge_fixed":
        return select_fixed(a, ratio)
    raise ValueError(method)


def merge(features: torch.Tensor, keys: torch.Tensor, a: list[float], kept: list[int]) -> list[torch.Tensor]:
    """Each kept patch: the a-weighted average (weights normalised over the group) of itself and its
    K nearest patches by key cosine (lower index on ties), float32."""
    n = features.shape[0]
    out = []
    for i in kept:
        sims = [(cosine(keys[i], keys[j]), j) for j in range(n) if j != i]
        nearest = [j for _, j in sorted(sims, key=lambda s: (-s[0], s[1]))[: min(K_NEIGHBOURS, n - 1)]]
        group = [i] + nearest
        total = sum(a[j] for j in group)
        acc = torch.zeros(features.shape[-1], dtype=torch.float32)
        for j in group:
            acc = acc + (a[j] / total) * features[j].float()
        out.append(acc)
    return out


def vision_inputs(model, pixel_values: torch.Tensor):
    """``(a [S][N] floats, keys [S, N, Dk], features [S, N, D])`` of each image."""
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[-1]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden[-2])
        s, t, _ = x.shape
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(x).float()
        k = attn.k_proj(x).float()
        importance = []
        for img in range(s):
            per_head = []
            for h in range(heads):
                qh = q[img, 0, h * hd:(h + 1) * hd]
                kh = k[img, :, h * hd:(h + 1) * hd]
                per_head.append(torch.softmax(kh @ qh / math.sqrt(hd), dim=0))
            importance.append(torch.stack(per_head).mean(0)[1:].tolist())
        feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return importance, k[:, 1:], feats


# --------------------------------------------------------------------------------------------
# Driving the language model, one sample at a time
# --------------------------------------------------------------------------------------------


def _compressed_sample(model, ids, mask_row, pos_row, vis, method, ratio):
    """Token records and input embeddings ``[1, T_b, D]`` of one compressed sample."""
    importance, keys, feats, next_image = vis
    image_id = model.config.image_token_id
    embeds = model.get_input_embeddings()(ids[None])[0]
    toks, rows, kept_counts = [], [], []
    t = 0
    while t < len(ids):
        if int(ids[t]) != image_id:
            toks.append(_Tok("text", int(pos_row[t]), bool(mask_row[t])))
            rows.append(embeds[t])
            t += 1
            continue
        start = t
        while t < len(ids) and int(ids[t]) == image_id:
            t += 1
        img = next_image.pop(0)
        a = importance[img]
        if t - start != len(a):
            raise ValueError(f"span of {t - start} tokens for an image of {len(a)} patches")
        kept = select(method, a, ratio)
        kept_counts.append(len(kept))
        for j, m in zip(kept, merge(feats[img], keys[img], a, kept)):
            toks.append(_Tok("vis", int(pos_row[start + j]), bool(mask_row[start + j])))
            rows.append(m.to(embeds.dtype))
    return toks, torch.stack(rows)[None], kept_counts


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


def _samples(model, input_ids, pixel_values, attention_mask, method, ratio, positions):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    importance, keys, feats = vision_inputs(model, pixel_values)
    order = list(range(len(importance)))  # images in sample order, spans in sequence order
    pos = _input_positions(input_ids, attention_mask, positions)
    for b in range(input_ids.shape[0]):
        yield _compressed_sample(model, input_ids[b], attention_mask[b], pos[b], (importance, keys, feats, order),
                                 method, ratio), pos[b]


def prumerge_oracle_logits(model, input_ids, pixel_values, attention_mask=None, *, method="prumerge", ratio=0.5):
    """``(last-position logits [B, V] float32, kept patches per image)``; positions ``arange(T)``."""
    logits, counts = [], []
    for (toks, hidden, kept), _ in _samples(model, input_ids, pixel_values, attention_mask, method, ratio, "arange"):
        logits.append(_prefill(model, toks, hidden)[0])
        counts += kept
    return torch.stack(logits), counts


def prumerge_oracle_generate(model, input_ids, pixel_values, attention_mask=None, *, method="prumerge", ratio=0.5,
                             max_new_tokens=8):
    """Greedy generation, each sample alone: ``(tokens [B, n], per-step logits list of [B, V], kept counts)``.

    Prefill positions follow ``generate`` (``attention_mask.cumsum − 1``); decode step ``t`` has position
    ``last input position + 1 + t`` and attends to the cache of the compressed prompt plus new tokens.
    """
    lm = model.model.language_model
    tokens, steps, counts = [], [], []
    for (toks, hidden, kept), pos in _samples(model, input_ids, pixel_values, attention_mask, method, ratio,
                                              "generate"):
        counts += kept
        caches: list = []
        logits = _prefill(model, toks, hidden, kv=caches)
        sample_steps, sample_tokens = [logits[0]], []
        with torch.no_grad():
            tok = torch.argmax(logits, dim=-1)
            sample_tokens.append(tok[0])
            for t in range(max_new_tokens - 1):
                h = model.get_input_embeddings()(tok[:, None])
                position = torch.tensor([[int(pos[-1]) + 1 + t]])
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
