"""Why a transformers image-text-to-text class has no adapter: the reasons ``libra-fx families`` prints.

Read by :mod:`libra_fx.conformance.table`; a class listed here runs uncompressed under
``libra_fx.compile``, with a ``LibraFallbackWarning`` (``strict=True``: ``UnsupportedGraph``).
"""

from __future__ import annotations

_PER_LAYER = ("per-layer input embeddings (a [B, T, layers, d] tensor read by every decoder layer) and layers "
              "that reuse an earlier layer's KV cache: no adapter yet")
_QFORMER = "a Q-Former's query tokens stand for the image: no adapter yet"
_NOT_IMAGE_TEXT = "not an image-to-text decoder LM"

REASONS: dict[str, str] = {
    "gemma3n": _PER_LAYER, "gemma4": _PER_LAYER,
    "gemma4_unified": "layers that reuse an earlier layer's KV cache (KV sharing): no adapter yet",
    "idefics2": "image tiles with text markers (as Idefics3's) fed through a perceiver resampler: no adapter yet",
    "granite_docling": "a connector with a density router and DeepStack merges: no adapter yet",
    "mllama": "cross-attention LM: images are keys of cross-attention layers, not tokens of the sequence",
    "idefics": "cross-attention LM (gated cross-attention to the images)",
    "blip-2": _QFORMER, "instructblip": _QFORMER, "instructblipvideo": _QFORMER,
    "evolla": _NOT_IMAGE_TEXT + " (protein sequences, cross-attention)",
    "pi0": _NOT_IMAGE_TEXT + " (a robot-action flow-matching expert)",
    "diffusion_gemma": _NOT_IMAGE_TEXT + " (block diffusion, not causal decoding)",
    "ovis2": "visual tokens are a probabilistic mix of a visual vocabulary embedded inside the forward; "
             "no adapter yet",
    "fuyu": "image patches are linear embeddings interleaved with newline tokens: no adapter yet",
    "chameleon": "images are VQ tokens of the text vocabulary (no vision features to compress)",
    "emu3": "images are VQ tokens of the text vocabulary (no vision features to compress)",
    "kosmos-2": "image features are a prefix with a grounding vocabulary: no adapter yet",
}
NO_ADAPTER = "no adapter yet: runs uncompressed, with a LibraFallbackWarning"
ENCODER_DECODER = "encoder-decoder: the image feeds an encoder, not the decoder's sequence"
