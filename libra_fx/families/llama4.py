"""Llama4: mixture-of-experts layers, chunked-attention layers, and layers without RoPE.

- *MoE.* The router scores all ``B·T`` tokens and the experts take ``E·B·T`` rows: sizes derived from the
  sequence length, so the length is kept symbolic (``symbolic_length``) and the passes compute them
  again from the compressed length.
- *Chunked attention* (RoPE layers) attends within chunks of ``attention_chunk_size`` positions. After a
  stage the chunks count original positions (the gathered mask, contract §5), as sliding windows do;
  its cache is a sliding-window cache of the chunk size, so decoding past the first chunk on a
  compressed cache is refused, as past a window.
- *NoPE layers* scale their queries by position (``attn_temperature_tuning``, a step every
  ``floor_scale`` = 8192 positions): in prefill the scales are per-token data, gathered by source
  (original positions); within the first chunk of decode the scale is 1 whatever the position.

transformers 5.24's ``Llama4ForConditionalGeneration.forward`` reads ``image_outputs`` off the language
model's output, which has no such field, so every call raises ``AttributeError`` (eager too). The
tiny model gets a language model that returns it (:meth:`Llama4Fixture.adapt_tiny`); a user's model
is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_fx.families.base import FamilyAdapter, FamilyFixture
from libra_fx.runtime.compat import returned_cache

LLAMA4 = FamilyAdapter(
    "Llama4", ("Llama4ForConditionalGeneration",), ("modeling_llama4",),
    span_notes="one span per image (one tile); chunked-attention layers count chunks in original positions",
    symbolic_length=True,
)


@dataclass(frozen=True)
class Llama4Fixture(FamilyFixture):
    def adapt_tiny(self, model) -> None:
        """Only where this transformers' own forward fails (5.24: ``image_outputs``; 5.25 runs as it is)."""
        from transformers.models.llama4.modeling_llama4 import Llama4CausalLMOutputWithPast

        try:
            with torch.no_grad():
                model(input_ids=torch.full((1, 2), 3))
            return
        except AttributeError as error:
            if "image_outputs" not in str(error):
                raise
        language_model = model.language_model
        forward = language_model.forward

        def with_image_outputs(*args, **kwargs):
            out = forward(*args, **kwargs)
            return Llama4CausalLMOutputWithPast(logits=out.logits, cache=returned_cache(out),
                                                hidden_states=out.hidden_states, attentions=out.attentions,
                                                router_logits=out.router_logits)

        language_model.forward = with_image_outputs


LLAMA4_FIXTURE = Llama4Fixture(
    LLAMA4, ("llama4",),
    stand_in="transformers 5.24's forward raises AttributeError (image_outputs); there, the tiny model's "
             "language model returns the field",
    tiny=dict(text_config=dict(no_rope_layers=[1, 1, 1, 0], moe_layers=[0, 1, 2, 3], intermediate_size_mlp=128,
                               num_local_experts=4, attention_chunk_size=48),
              vision_config=dict(image_size=64, intermediate_size=128, vision_output_dim=64, projector_input_dim=64,
                                 projector_output_dim=64)),
)
