"""The two ways libra-fx says "not compressed": a warning (the default) or an error (``strict=True``)."""

from __future__ import annotations


class LibraFallbackWarning(UserWarning):
    """A model or graph runs uncompressed because libra-fx cannot rewrite it safely; the message says why."""


class UnsupportedGraph(Exception):
    """The passes cannot rewrite this graph safely; the message says why (raised under ``strict=True``)."""


class NothingToCompress(Exception):
    """The graph holds no visual tokens (a text-only prompt, a vision-only part): it is left as it is."""
