"""Derived seeds: one run seed fans out into independent, reproducible streams."""

from __future__ import annotations

import hashlib
import json


def derive_seed(seed: int, *parts: int | str, bits: int = 31) -> int:
    """A `bits`-bit seed (at most 63) determined by `seed` and `parts` (e.g. a purpose, a
    round, an institution). 31 bits suit every library's RNG; the DP noise generator takes 63,
    so that a secret seed cannot be found by trying them all.

    The inputs are hashed with SHA-256 in an unambiguous encoding, so `(1,)`, `(1, 0)` and
    `("1",)` give unrelated seeds and no two institutions or rounds share batch or noise
    randomness.
    """
    encoded = json.dumps([seed, *parts], separators=(",", ":")).encode()
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in 1..63, got {bits}")
    value = int.from_bytes(hashlib.sha256(encoded).digest()[:8], "big")
    # Up to 32 bits from the first 4 bytes, as seeds have always been derived here.
    return (value >> 32 if bits <= 32 else value) & ((1 << bits) - 1)
