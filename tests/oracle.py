"""Independent, slow, eager reference ("oracle") for the token-compression contract.

Written straight from ``SPEC.md`` (sections 1-6) without importing anything from ``libra_fx``
(other than ``libra_fx.testing`` in the tests). It drives a ``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` or
``Qwen2_5_VLForConditionalGeneration`` by hand: it embeds the tokens, scatters the image (or
video) features, and calls every decoder layer itself with explicit position ids, explicit RoPE
cos/sin and an explicit 4-D additive attention mask. What differs between the families (how to
get the visual features, the position ids of the input, 1-D RoPE or M-RoPE) lives in a small
adapter (:class:`_Family`, :class:`_MRopeFamily`); the driver and the token maths are shared.
After each compression layer it computes the importance alpha from that layer's own modules and
rewrites the sequence with plain Python loops over samples, spans and targets.

Public entry points: :func:`oracle_logits` (prefill logits) and :func:`oracle_generate` (greedy
generation, compression in prefill only, per-layer KV caches of different lengths; contract §5).

Decisions taken where SPEC leaves room (see also the report / README):

* ``Nt = clamp(floor(N * (1 - R) + 0.5), 1, N)`` (round half *up*, not Python's banker's round).
* Top-k selectors (``fastv``, ``turbo``, ``merge``) break ties towards the lower span rank.
* Position ids of the uncompressed input mirror transformers' ``LlamaModel``: ``arange(T)`` for
  every sample, padding or not (the installed ``LlamaModel.forward`` does exactly that when
  ``position_ids`` is None, and ``LlavaModel`` does not compute any).
* The query of alpha is the last token whose ``attention_mask`` is 1 (last position under left
  padding). q and k are cast to float32 before ``q . k``; the softmax is in float32.
* ``turbo`` with a single-token span: ``r_j`` (a max over an empty set) is taken as 0; it does not
  matter since then ``Nt = N = 1``.
* Every sample of a batch must end up with the same compressed length (true whenever every
  sample has spans of the same lengths, as ``tiny_llava_inputs`` builds); otherwise ValueError.
* ``layers`` must be strictly increasing and inside ``[0, num_layers)``.

Model families:

* A visual token is a placeholder position that the model scatters vision features into
  (``image_token_id``; for Qwen2-VL also ``video_token_id`` when video features are given). A span
  is a contiguous run of them. LLaVA-NeXT: the ``image_newline`` rows are features the model
  scatters into placeholders, so they are part of the span (the lead's decision).
* Qwen2-VL / Qwen2.5-VL (M-RoPE): a position id is a triple (t, h, w). The input's triples are
  the model's own ``get_rope_index`` (with the attention mask, as both ``forward`` and ``generate``
  call it), so padding sits at (0, 0, 0) and each sample's positions ignore its padding. A merged
  token keeps its target's triple; a compensation token takes the triple of its span's last input
  token. cos/sin come from the model's ``rotary_emb`` fed the [3, B, T] ids of the current
  sequence. Decode step ``t`` uses the last prompt token's triple ``+ 1 + t`` in every component
  (what ``generate`` does: ``position_ids[..., -1:] + 1``, i.e. text positions + ``rope_deltas``
  of the full uncompressed prompt).
* LLaVA-NeXT positions are LLaVA's (``arange`` in ``forward``, the mask cumsum in ``generate``).
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

METHODS = ("libra", "fastv", "turbo", "merge", "pti", "igm_pos", "igm_neg")

# method -> (selector, compressor)
_RECIPES = {
    "libra": ("pti", "igm"),
    "fastv": ("topk_alpha", "prune"),
    "turbo": ("topk_informativity", "average"),
    "merge": ("topk_alpha", "average"),
    "pti": ("pti", "average"),
    "igm_pos": ("pti", "igm_pos"),
    "igm_neg": ("pti", "igm_neg"),
}


# --------------------------------------------------------------------------------------------
# Small token maths (plain Python over float32 values)
# --------------------------------------------------------------------------------------------


def num_targets(n: int, ratio: float) -> int:
    """``Nt = clamp(round_half_up(N * (1 - R)), 1, N)``, R read as the decimal it prints as."""
    nt = int(math.floor(n * (1 - Fraction(repr(float(ratio)))) + Fraction(1, 2)))
    return max(1, min(n, nt))


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """``x.y / max(|x| |y|, 1e-8)`` in float32."""
    x = x.float()
    y = y.float()
    num = torch.dot(x, y)
    den = torch.clamp(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y), min=1e-8)
    return float(num / den)


def _argmax_first(values: list[float]) -> int:
    """Index of the largest value; the first one on ties."""
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def _top_k_in_order(scores: list[float], k: int) -> list[int]:
    """The k highest scores (lower index wins ties), returned in increasing index order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


def select_pti(alpha: list[float], nt: int) -> list[int]:
    """contract §3: one target per interval, the interval's argmax of alpha (first on ties)."""
    n = len(alpha)
    targets = []
    for i in range(nt):
        lo = (i * n) // nt
        hi = ((i + 1) * n) // nt  # exclusive
        best = lo
        for j in range(lo, hi):
            if alpha[j] > alpha[best]:
                best = j
        targets.append(best)
    return targets


def select_topk_alpha(alpha: list[float], nt: int) -> list[int]:
    return _top_k_in_order(alpha, nt)


def select_topk_informativity(alpha: list[float], H: torch.Tensor, nt: int, lam: float = 1.0) -> list[int]:
    """turbo: ``I_j = alpha_j / mean(alpha) - lam * max_{k != j} cos(H_j, H_k)``."""
    n = len(alpha)
    mean_alpha = float(torch.tensor(alpha, dtype=torch.float32).mean())
    scores = []
    for j in range(n):
        r = None
        for k in range(n):
            if k == j:
                continue
            c = cosine(H[j], H[k])
            if r is None or c > r:
                r = c
        if r is None:
            r = 0.0
        scores.append(alpha[j] / mean_alpha - lam * r)
    return _top_k_in_order(scores, nt)


def _weighted(alpha: list[float], H: torch.Tensor, members: list[int], eta: float) -> torch.Tensor:
    """``sum_j softmax(alpha_j / eta) H[j]`` over ``members`` (float32)."""
    logits = torch.tensor([alpha[j] / eta for j in members], dtype=torch.float32)
    w = torch.softmax(logits, dim=0)
    out = torch.zeros(H.shape[-1], dtype=torch.float32)
    for wj, j in zip(w, members):
        out = out + wj * H[j].float()
    return out


def compress_igm(
    alpha: list[float],
    H: torch.Tensor,
    targets: list[int],
    tau: float,
    eta: float,
    make_compensation: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """contract §4. Returns ([m_0 .. m_{Nt-1}], c or None), all float32."""
    n = len(alpha)
    nt = len(targets)
    is_target = {t: i for i, t in enumerate(targets)}
    group = [0] * n
    best_sim = [0.0] * n
    for j in range(n):
        sims = [cosine(H[targets[i]], H[j]) for i in range(nt)]
        g = _argmax_first(sims)
        group[j] = g
        best_sim[j] = sims[g]
        if j in is_target:
            group[j] = is_target[j]
    positive = [j for j in range(n) if j in is_target or best_sim[j] > tau]
    negative = [j for j in range(n) if not (j in is_target or best_sim[j] > tau)]

    merged = []
    for i in range(nt):
        members = [j for j in positive if group[j] == i]
        merged.append(_weighted(alpha, H, members, eta))

    comp = None
    if make_compensation:
        pool = negative
        if not pool:
            pool = [j for j in range(n) if j not in is_target]
        if not pool:
            pool = list(range(n))
        comp = _weighted(alpha, H, pool, eta)
    return merged, comp


def compress_average(H: torch.Tensor, targets: list[int]) -> list[torch.Tensor]:
    """Each non-target joins its most similar target (first on ties); plain mean per group."""
    n = H.shape[0]
    nt = len(targets)
    groups = [[t] for t in targets]
    for j in range(n):
        if j in targets:
            continue
        sims = [cosine(H[targets[i]], H[j]) for i in range(nt)]
        groups[_argmax_first(sims)].append(j)
    merged = []
    for members in groups:
        acc = torch.zeros(H.shape[-1], dtype=torch.float32)
        for j in members:
            acc = acc + H[j].float()
        merged.append(acc / len(members))
    return merged


def compress_span(
    method: str, alpha: list[float], H: torch.Tensor, ratio: float, tau: float, eta
) -> tuple[list[int], list[torch.Tensor], torch.Tensor | None]:
    """One span, one stage. Returns (targets, merged float32 rows, compensation row or None)."""
    selector, compressor = _RECIPES[method]
    n = len(alpha)
    nt = num_targets(n, ratio)
    H = H.float()
    if selector == "pti":
        targets = select_pti(alpha, nt)
    elif selector == "topk_alpha":
        targets = select_topk_alpha(alpha, nt)
    else:
        targets = select_topk_informativity(alpha, H, nt)

    if isinstance(eta, str):
        if eta != "mean":
            raise ValueError(f"eta must be 'mean' or a float, got {eta!r}")
        eta_value = float(torch.tensor(alpha, dtype=torch.float32).mean())
    else:
        eta_value = float(eta)

    if compressor == "igm":
        merged, comp = compress_igm(alpha, H, targets, tau, eta_value, True)
    elif compressor == "igm_pos":
        merged, comp = compress_igm(alpha, H, targets, -math.inf, eta_value, False)
    elif compressor == "igm_neg":
        merged, comp = compress_igm(alpha, H, targets, math.inf, eta_value, True)
    elif compressor == "average":
        merged, comp = compress_average(H, targets), None
    else:  # prune
        merged, comp = [H[t].clone() for t in targets], None
    return targets, merged, comp


# --------------------------------------------------------------------------------------------
# Model driving
# --------------------------------------------------------------------------------------------


class _Tok:
    """One token of the current sequence of one sample."""

    __slots__ = ("kind", "pos", "valid", "span", "span_last_pos")

    def __init__(self, kind, pos, valid, span=None, span_last_pos=None):
        self.kind = kind  # "text", "vis" (a span token or merged target) or "comp"
        self.pos = pos  # position id (int)
        self.valid = valid  # attention_mask value (bool)
        self.span = span  # span index within the sample (vis / comp)
        self.span_last_pos = span_last_pos  # original position of the span's last input token


def _build_mask(toks: list[list[_Tok]], dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: 0 where key j <= query i and key j is not padding."""
    B = len(toks)
    T = len(toks[0])
    neg = torch.finfo(dtype).min
    rows = [[[0.0 if j <= i and toks[b][j].valid else neg for j in range(T)] for i in range(T)] for b in range(B)]
    return torch.tensor(rows, dtype=dtype).view(B, 1, T, T)


def _position_ids(toks: list[list[_Tok]]) -> torch.Tensor:
    """[B, T] for integer positions; [3, B, T] when positions are M-RoPE triples."""
    ids = torch.tensor([[t.pos for t in row] for row in toks], dtype=torch.long)
    return ids.permute(2, 0, 1).contiguous() if ids.dim() == 3 else ids


def _importance(layer, h_in: torch.Tensor, mask: torch.Tensor, cos, sin, toks,
                apply_rope=apply_rotary_pos_emb) -> list[list[float]]:
    """contract §2: last-query attention row of ``layer``, mean over heads, float32. [B][T]."""
    attn = layer.self_attn
    x = layer.input_layernorm(h_in)
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rope(q, q, cos, sin)
    k, _ = _layer_kv(layer, h_in, cos, sin, apply_rope)
    n_heads, n_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # GQA: query head h uses kv head h // groups
    out = []
    for b in range(B):
        query = max(i for i in range(T) if toks[b][i].valid)
        qb = q[b, :, query, :].float()  # [heads, hd]
        kb = k[b].float()  # [heads, T, hd]
        scores = torch.einsum("hd,htd->ht", qb, kb) * attn.scaling + mask[b, 0, query].float()[None, :]
        p = torch.softmax(scores, dim=-1, dtype=torch.float32)
        out.append(p.mean(dim=0).tolist())
    return out


def _compress_sample(method, row: list[_Tok], alpha: list[float], H: torch.Tensor, ratio, tau, eta):
    """Rewrite one sample's sequence. Returns (new tokens, new hidden rows [T', D])."""
    new_toks: list[_Tok] = []
    new_rows: list[torch.Tensor] = []
    T = len(row)
    i = 0
    while i < T:
        tok = row[i]
        if tok.kind != "vis":
            new_toks.append(tok)
            new_rows.append(H[i])
            i += 1
            continue
        s = tok.span
        span_idx = []
        while i < T and row[i].kind == "vis" and row[i].span == s:
            span_idx.append(i)
            i += 1
        carried = []
        while i < T and row[i].kind == "comp" and row[i].span == s:
            carried.append(i)
            i += 1
        span_alpha = [alpha[j] for j in span_idx]
        span_H = torch.stack([H[j] for j in span_idx])
        targets, merged, comp = compress_span(method, span_alpha, span_H, ratio, tau, eta)
        for t, m in zip(targets, merged):
            src = row[span_idx[t]]
            new_toks.append(_Tok("vis", src.pos, True, s, src.span_last_pos))
            new_rows.append(m.to(H.dtype))
        for j in carried:
            new_toks.append(row[j])
            new_rows.append(H[j])
        if comp is not None:
            new_toks.append(_Tok("comp", tok.span_last_pos, True, s, tok.span_last_pos))
            new_rows.append(comp.to(H.dtype))
    return new_toks, torch.stack(new_rows)


def _scatter(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, feats: torch.Tensor, what: str) -> torch.Tensor:
    """Write ``feats`` rows, in order, into the positions of ``token_id`` (row-major), by hand."""
    n = 0
    B, T = input_ids.shape
    for b in range(B):
        for t in range(T):
            if int(input_ids[b, t]) == token_id:
                if n >= feats.shape[0]:
                    raise ValueError(f"more {what} tokens than {what} features ({feats.shape[0]})")
                embeds[b, t] = feats[n]
                n += 1
    if n != feats.shape[0]:
        raise ValueError(f"{n} {what} tokens but {feats.shape[0]} {what} features")
    return embeds


def _flat_features(out, dtype) -> torch.Tensor:
    feats = out.pooler_output
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats), dim=0)
    else:
        feats = feats.reshape(-1, feats.shape[-1])
    return feats.to(dtype)


def _embed(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, **extra) -> torch.Tensor:
    """Token embeddings with the visual features scattered in (see :meth:`_Family.embed`)."""
    return _family(model).embed(input_ids, pixel_values, extra)[0]


def _input_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, convention: str) -> torch.Tensor:
    """[B, T] position ids of the uncompressed input.

    ``"arange"``: ``arange(T)`` for every sample (``LlamaModel.forward`` with ``position_ids=None``).
    ``"generate"``: what ``GenerationMixin._prepare_position_ids_for_generation`` does:
    ``attention_mask.cumsum(-1) - 1`` with padding set to 0 when a mask is given, else ``arange(T)``.
    """
    B, T = input_ids.shape
    if convention == "generate" and attention_mask is not None:
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)
    if convention not in ("arange", "generate"):
        raise ValueError(f"unknown position convention {convention!r}")
    return torch.arange(T, dtype=torch.long).unsqueeze(0).expand(B, T)


# --------------------------------------------------------------------------------------------
# Model families: what differs between LLaVA / LLaVA-NeXT (1-D RoPE) and Qwen2(.5)-VL (M-RoPE)
# --------------------------------------------------------------------------------------------

# Inputs the oracle accepts beside input_ids / pixel_values / attention_mask.
_EXTRA_INPUTS = ("image_sizes", "image_grid_thw", "video_grid_thw", "pixel_values_videos",
                 "mm_token_type_ids", "second_per_grid_ts")


class _Family:
    """LLaVA and LLaVA-NeXT: a Llama-style language model with 1-D positions.

    The family's RoPE application is the ``apply_rotary_pos_emb`` of the module that defines the
    model's attention class (the same function the attention itself calls).
    """

    mrope = False

    def __init__(self, model):
        self.model = model
        self.lm = model.model.language_model
        module = sys.modules[type(self.lm.layers[0].self_attn).__module__]
        self.apply_rope = getattr(module, "apply_rotary_pos_emb", apply_rotary_pos_emb)

    # -- visual features
    def embed(self, input_ids, pixel_values, extra) -> tuple[torch.Tensor, set[int]]:
        """(embeddings [B, T, D] with the features scattered in, the placeholder ids that got features)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        image_id = self.model.config.image_token_id
        if pixel_values is None or not bool((input_ids == image_id).any()):
            return embeds, set()
        kwargs = {}
        if extra.get("image_sizes") is not None:  # LLaVA-NeXT: any-resolution tiles + newlines
            kwargs["image_sizes"] = extra["image_sizes"]
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs)
        embeds = _scatter(embeds.clone(), input_ids, image_id, _flat_features(out, embeds.dtype), "image")
        return embeds, {image_id}

    # -- positions
    def input_positions(self, input_ids, attention_mask, convention, extra) -> list[list]:
        """Per sample, per token: the position id of the uncompressed input (an int)."""
        return _input_positions(input_ids, attention_mask, convention).tolist()

    def rope(self, hidden: torch.Tensor, pos: torch.Tensor):
        return self.lm.rotary_emb(hidden, pos)

    def layer_position_ids(self, pos: torch.Tensor):
        return pos

    @staticmethod
    def shift(pos, k: int):
        """Position ``pos`` moved ``k`` steps on (every component of an M-RoPE triple)."""
        return tuple(p + k for p in pos) if isinstance(pos, tuple) else pos + k


class _MRopeFamily(_Family):
    """Qwen2-VL and Qwen2.5-VL: images and videos of any size, M-RoPE triples (t, h, w)."""

    mrope = True

    def embed(self, input_ids, pixel_values, extra):
        embeds = self.model.get_input_embeddings()(input_ids)
        config = self.model.config
        used = set()
        videos = extra.get("pixel_values_videos")
        if pixel_values is not None and bool((input_ids == config.image_token_id).any()):
            out = self.model.model.get_image_features(pixel_values, extra.get("image_grid_thw"), return_dict=True)
            embeds = _scatter(embeds.clone(), input_ids, config.image_token_id,
                              _flat_features(out, embeds.dtype), "image")
            used.add(config.image_token_id)
        if videos is not None and bool((input_ids == config.video_token_id).any()):
            out = self.model.model.get_video_features(videos, extra.get("video_grid_thw"), return_dict=True)
            embeds = _scatter(embeds.clone(), input_ids, config.video_token_id,
                              _flat_features(out, embeds.dtype), "video")
            used.add(config.video_token_id)
        return embeds, used

    def input_positions(self, input_ids, attention_mask, convention, extra):
        """The model's own ``get_rope_index`` (as ``forward`` and ``generate`` both call it, with the
        attention mask): per sample, per token, a triple (t, h, w). Text-only input: ``t = h = w``
        following the 1-D convention (what the model does without grids)."""
        if convention not in ("arange", "generate"):
            raise ValueError(f"unknown position convention {convention!r}")
        config = self.model.config
        image_grid, video_grid = extra.get("image_grid_thw"), extra.get("video_grid_thw")
        if image_grid is None and video_grid is None:
            flat = _input_positions(input_ids, attention_mask, convention).tolist()
            return [[(p, p, p) for p in row] for row in flat]
        types = extra.get("mm_token_type_ids")
        if types is None:
            types = torch.zeros_like(input_ids, dtype=torch.int)
            types = types.masked_fill(input_ids == config.image_token_id, 1)
            types = types.masked_fill(input_ids == config.video_token_id, 2)
        kwargs = dict(image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=attention_mask)
        if extra.get("second_per_grid_ts") is not None:
            kwargs["second_per_grid_ts"] = extra["second_per_grid_ts"]
        pos, _ = self.model.model.get_rope_index(input_ids, types, **kwargs)  # [3, B, T]
        return [[tuple(int(x) for x in pos[:, b, t]) for t in range(input_ids.shape[1])]
                for b in range(input_ids.shape[0])]

    def rope(self, hidden, pos):
        assert pos.dim() == 3 and pos.shape[0] == 3, pos.shape
        cos, sin = self.lm.rotary_emb(hidden, pos)
        assert cos.dim() == 3, "expected M-RoPE sections already folded into cos/sin [B, T, head_dim]"
        return cos, sin

    def layer_position_ids(self, pos):
        return None  # the text model passes its (absent) text positions; sdpa / eager ignore them


def _family(model) -> _Family:
    if hasattr(model.model, "get_rope_index"):
        return _MRopeFamily(model)
    return _Family(model)


def _layer_kv(layer, h_in: torch.Tensor, cos, sin, apply_rope=apply_rotary_pos_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value states of ``layer`` for input ``h_in`` [B, T, D]: after RoPE, before GQA repeat.

    Same modules and ops as ``LlamaAttention.forward``: [B, kv_heads, T, head_dim] each.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(h_in)
    B, T, _ = x.shape
    hd = attn.head_dim
    k = attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    _, k = apply_rope(k, k, cos, sin)
    return k, v


def _check_extra(extra: dict) -> dict:
    unknown = sorted(set(extra) - set(_EXTRA_INPUTS))
    if unknown:
        raise TypeError(f"the oracle does not take {unknown}; it takes {list(_EXTRA_INPUTS)}")
    return extra


def _run(model, input_ids, pixel_values=None, attention_mask=None, *, method="libra", ratio=0.5,
         layers=(1,), tau=0.7, eta="mean", trace=None, positions="arange", kv=None, **extra):
    """Prefill. ``positions``: see :func:`_input_positions`. ``kv``: a list that, when given, receives
    one ``(keys, values, valid)`` per decoder layer (``valid`` [B, S] bool: the padding mask of the
    sequence that layer saw). ``extra``: the model's other inputs (``_EXTRA_INPUTS``), e.g.
    ``image_grid_thw`` / ``mm_token_type_ids`` (Qwen2-VL) or ``image_sizes`` (LLaVA-NeXT).
    ``trace`` (a dict), when given, also receives ``"input_positions"`` (per sample, per token)."""
    _check_extra(extra)
    family = _family(model)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    ratios = tuple(ratio) if isinstance(ratio, (tuple, list)) else (ratio,) * len(layers)  # one per stage
    if len(ratios) != len(layers) or not all(0 <= r < 1 for r in ratios):
        raise ValueError("ratio must be in [0, 1), or one such ratio per layer")
    lm = model.model.language_model
    decoder_layers = list(lm.layers)
    layers = tuple(int(x) for x in layers)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError("layers must be strictly increasing")
    if any(x < 0 or x >= len(decoder_layers) for x in layers):
        raise ValueError("layer index out of range")
    stages = {layer: r for layer, r in zip(layers, ratios) if r > 0}

    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    with torch.no_grad():
        # Visual tokens: the placeholder positions that received vision features.
        hidden, visual_ids = family.embed(input_ids, pixel_values, extra)
        dtype = hidden.dtype

        # Token records. LLaVA: positions arange(T) as transformers' LlamaModel does (oracle_logits)
        # or the attention_mask cumsum as GenerationMixin does (oracle_generate). Qwen2-VL: the
        # model's get_rope_index triples (both calls use them).
        in_pos = family.input_positions(input_ids, attention_mask, positions, extra)
        if trace is not None:
            trace["input_positions"] = in_pos
        toks: list[list[_Tok]] = []
        for b in range(B):
            row = []
            t = 0
            span = 0
            while t < T:
                if int(input_ids[b, t]) in visual_ids:
                    start = t
                    while t < T and int(input_ids[b, t]) in visual_ids:
                        t += 1
                    last = t - 1
                    for u in range(start, t):
                        row.append(_Tok("vis", in_pos[b][u], bool(attention_mask[b, u]), span, in_pos[b][last]))
                    span += 1
                else:
                    row.append(_Tok("text", in_pos[b][t], bool(attention_mask[b, t])))
                    t += 1
            toks.append(row)

        counts: list[int] = []
        for idx, layer in enumerate(decoder_layers):
            mask = _build_mask(toks, dtype)
            pos = _position_ids(toks)
            cos, sin = family.rope(hidden, pos)
            if kv is not None:
                k_states, v_states = _layer_kv(layer, hidden, cos, sin, family.apply_rope)
                valid = torch.tensor([[t.valid for t in row] for row in toks], dtype=torch.bool)
                kv.append((k_states, v_states, valid))
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=family.layer_position_ids(pos),
                position_embeddings=(cos, sin),
                past_key_values=None,
                use_cache=False,
            )
            h_out = out[0] if isinstance(out, tuple) else out
            if idx in stages:
                alpha = _importance(layer, hidden, mask, cos, sin, toks, family.apply_rope)
                if trace is not None:
                    trace.setdefault("alpha", []).append(alpha)
                new_toks, new_rows = [], []
                for b in range(B):
                    nt, nr = _compress_sample(method, toks[b], alpha[b], h_out[b], stages[idx], tau, eta)
                    new_toks.append(nt)
                    new_rows.append(nr)
                if len({len(r) for r in new_toks}) != 1:
                    raise ValueError("samples compress to different lengths")
                toks = new_toks
                h_out = torch.stack(new_rows)
                counts.append(sum(1 for t in toks[0] if t.kind in ("vis", "comp")))
                if trace is not None:
                    trace.setdefault("positions", []).append([[t.pos for t in row] for row in toks])
                    trace.setdefault("kinds", []).append([[t.kind for t in row] for row in toks])
            hidden = h_out

        hidden = lm.norm(hidden)
        logits = model.lm_head(hidden[:, -1, :]).float()
    return logits, counts


def oracle_logits(model, input_ids, pixel_values=None, attention_mask=None, *,
                  method="libra", ratio=0.5, layers=(1,), tau=0.7, eta="mean", **extra) -> tuple[torch.Tensor, list[int]]:
    """Returns (last-position logits [B, V] float32, visual-token counts of sample 0 after each stage).

    ``ratio == 0`` or ``layers == ()`` runs the plain model (counts ``[]``). ``extra``: the model's
    other inputs, as its ``forward`` takes them (``image_grid_thw``, ``mm_token_type_ids``,
    ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``, ``image_sizes``).
    """
    return _run(model, input_ids, pixel_values, attention_mask, method=method, ratio=ratio,
                layers=layers, tau=tau, eta=eta, **extra)


# --------------------------------------------------------------------------------------------
# Generation (contract §5: compression in prefill only, each layer decodes against its own cache)
# --------------------------------------------------------------------------------------------


def _decode_layer(layer, h: torch.Tensor, cos, sin, cache: list, apply_rope=apply_rotary_pos_emb) -> torch.Tensor:
    """One decoder layer on one new token per sample, by hand.

    ``h`` [B, 1, D]; ``cache`` = [keys, values, valid] of this layer (its own length S), updated in
    place with the new token's key / value (always valid). The query attends to the S cached
    entries that are valid plus itself (everything cached precedes it, so no causal cut is needed).
    """
    attn = layer.self_attn
    B = h.shape[0]
    hd = attn.head_dim
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(B, 1, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, 1, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, 1, -1, hd).transpose(1, 2)
    q, k = apply_rope(q, k, cos, sin)
    keys = torch.cat([cache[0], k], dim=2)
    values = torch.cat([cache[1], v], dim=2)
    valid = torch.cat([cache[2], torch.ones(B, 1, dtype=torch.bool)], dim=1)
    cache[0], cache[1], cache[2] = keys, values, valid

    groups = q.shape[1] // keys.shape[1]
    keys_r = keys.repeat_interleave(groups, dim=1)  # query head h uses kv head h // groups
    values_r = values.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, keys_r.transpose(2, 3)) * attn.scaling  # [B, H, 1, S + 1]
    neg = torch.finfo(scores.dtype).min
    additive = torch.zeros(valid.shape, dtype=scores.dtype).masked_fill(~valid, neg)
    scores = scores + additive[:, None, None, :]
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(p, values_r).transpose(1, 2).reshape(B, 1, -1)
    h = h + attn.o_proj(o)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h


def oracle_generate(model, input_ids, pixel_values=None, attention_mask=None, *, method="libra", ratio=0.5,
                    layers=(1,), tau=0.7, eta="mean", max_new_tokens=8, **extra) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy generation with compression in prefill only.

    Returns (new tokens [B, max_new_tokens] long, per-step logits list of [B, V] float32; step 0 is
    the prefill's last-position logits).

    * Prefill: exactly :func:`oracle_logits`'s computation (same code path), except for the
      position ids of the input, which follow ``model.generate``: when ``attention_mask`` is given,
      ``position_ids = attention_mask.cumsum(-1) - 1`` with padding positions set to 0
      (``GenerationMixin._prepare_position_ids_for_generation`` in transformers 5.x); without
      ``attention_mask`` (treated as all ones), ``arange(T)``. Under left padding a sample thus
      has the same positions as when it is run alone, unpadded. (``oracle_logits`` keeps
      ``arange(T)`` for every sample, which is what a plain ``model(...)`` call does.) Without
      padding both conventions coincide, so step 0 equals ``oracle_logits`` then.
      Merged targets and compensation tokens take their position ids from these input positions.
    * KV cache: every decoder layer keeps the keys (after RoPE, before GQA repeat) and values of
      the sequence it saw in prefill, with that sequence's padding mask: layers ``0..L1`` the full
      sequence, later layers the compressed one of the stage(s) before them.
    * Decode step t (t = 0 .. max_new_tokens - 2): the input token is the argmax of the previous
      step's logits (first index on ties); its position id is ``last input position + 1 + t``
      (``model.generate``'s ``position_ids[..., -1:] + 1``): ``T + t`` without mask, the number of
      non-padding prompt tokens ``+ t`` under left padding. Each layer attends to its own cache
      (padding entries masked) plus the new token, then appends the new key / value.
    * Final norm + lm_head on the new token give that step's logits.
    * Qwen2-VL / Qwen2.5-VL: the input positions are the model's ``get_rope_index`` triples (as
      ``generate`` computes them, on the full uncompressed prompt); decode step t uses the last
      prompt token's triple ``+ 1 + t`` in each component (text positions + ``rope_deltas``).
      ``extra``: as in :func:`oracle_logits`.

    ``ratio == 0`` or ``layers == ()`` reproduces ``model.generate(..., do_sample=False)`` (with EOS
    disabled: this oracle never stops early).
    """
    kv: list = []
    trace: dict = {}
    logits, _ = _run(model, input_ids, pixel_values, attention_mask, method=method, ratio=ratio,
                     layers=layers, tau=tau, eta=eta, positions="generate", kv=kv, trace=trace, **extra)
    family = _family(model)
    B = input_ids.shape[0]
    lm = model.model.language_model
    decoder_layers = list(lm.layers)
    caches = [list(entry) for entry in kv]
    # The last prompt token's input position (int, or M-RoPE triple), as generate continues from it.
    last_pos = [row[-1] for row in trace["input_positions"]]

    steps = [logits]
    tokens = []
    if max_new_tokens <= 0:
        return torch.zeros(B, 0, dtype=torch.long), []
    with torch.no_grad():
        tok = torch.argmax(logits, dim=-1)
        tokens.append(tok)
        for t in range(max_new_tokens - 1):
            h = model.get_input_embeddings()(tok[:, None])  # [B, 1, D]
            pos = _position_ids([[_Tok("text", family.shift(p, 1 + t), True)] for p in last_pos])
            cos, sin = family.rope(h, pos)
            for layer, cache in zip(decoder_layers, caches):
                h = _decode_layer(layer, h, cos, sin, cache, family.apply_rope)
            h = lm.norm(h)
            step_logits = model.lm_head(h[:, -1, :]).float()
            steps.append(step_logits)
            tok = torch.argmax(step_logits, dim=-1)
            tokens.append(tok)
    return torch.stack(tokens, dim=1).long(), steps
