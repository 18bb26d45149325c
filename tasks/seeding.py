"""Derived seeds: one run seed fans out into independent, reproducible streams."""

from __future__ import annotations

import hashlib
import json


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 31-bit seed determined by `seed` and `parts` (e.g. a purpose, a round, an institution).

    The inputs are hashed with SHA-256 in an unambiguous encoding, so `(1,)`, `(1, 0)` and
    `("1",)` give unrelated seeds and no two institutions or rounds share batch or noise
    randomness.
    """
    encoded = json.dumps([seed, *parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(encoded).digest()[:4], "big") & 0x7FFFFFFF
