"""Seeding: every random draw in the world comes from a ``random.Random`` seeded by SHA-256 of its purpose.

Never ``hash()`` (salted per process) or global state: a world, its corpus, prompts and candidate answers
(and the simulated annotators' labels) are the same on every machine and in every run, and adding a draw
for one purpose changes nothing drawn for another.
"""

from __future__ import annotations

import hashlib
import random


def digest(*parts: object) -> int:
    """The first 8 bytes of SHA-256 of ``"|".join(parts)`` as an unsigned integer."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def seeded_rng(*parts: object) -> random.Random:
    """A generator seeded by the purpose of its draws, so adding one draw elsewhere changes nothing here."""
    return random.Random(digest(*parts))


def weighted_choice(rng: random.Random, weights: dict[str, float]) -> str:
    """One key of ``weights``, drawn with probability proportional to its value."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]
