"""How the commands write a count in their lines: ``1 epoch``, ``4 epochs``."""

from __future__ import annotations


def count(n: int, what: str, plural: str | None = None) -> str:
    """``n`` and the noun ``what``, plural unless ``n`` is 1 (``plural`` for nouns that take more than an s)."""
    return f"{n} {what if n == 1 else plural or what + 's'}"
