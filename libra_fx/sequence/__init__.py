"""Sequence plumbing: the functions the inserted graph nodes call, and the decode-step helpers.

- :mod:`~libra_fx.sequence.splice`: one compression stage — cut the spans out, splice the compressed
  tokens in, and the source index of every output token;
- :mod:`~libra_fx.sequence.gather`: re-index per-token tensors and masks by that source index;
- :mod:`~libra_fx.sequence.vision`: the vision-side stage and its padding-slot masks;
- :mod:`~libra_fx.sequence.decode`: what a decode step on a compressed cache needs;
- :mod:`~libra_fx.sequence.attention`: the ``libra|…`` attention functions that fit masks to shorter caches.
"""
