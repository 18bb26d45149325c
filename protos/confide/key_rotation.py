"""The signed message of a key rotation, shared by institutions (which sign) and the
coordinator (which verifies).

An institution proves it holds its CURRENT private key by signing, with it, a message that
binds everything the request changes or could be replayed against:

    b"confide key rotation v1\\n" + canonical JSON {"ca_fingerprint", "institution",
                                                     "new_public_key", "timestamp"}

- the domain prefix: a signature made for any other purpose can never pass as a rotation;
- the institution's name and the new public key: what the coordinator will register;
- the coordinator's CA fingerprint: a request cannot be replayed at another coordinator;
- the timestamp (seconds since the epoch): the coordinator accepts it within
  `MAX_CLOCK_SKEW` seconds, so a request copied from somewhere expires.

After a rotation the coordinator holds the new key, so the same request (signed by the old
one) no longer verifies. ECDSA with the hash matching the curve (SHA-256, -384, -512).
"""

from __future__ import annotations

import json

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DOMAIN = b"confide key rotation v1\n"
MAX_CLOCK_SKEW = 300  # seconds


def rotation_message(
    *, institution: str, new_public_key: bytes, ca_fingerprint: str, timestamp: int
) -> bytes:
    """The exact bytes signed for a rotation (see the module's docstring)."""
    fields = {
        "ca_fingerprint": ca_fingerprint,
        "institution": institution,
        "new_public_key": new_public_key.decode("ascii"),
        "timestamp": int(timestamp),
    }
    return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    """The hash of the curve's strength: SHA-256 for P-256, SHA-384 for P-384, else SHA-512."""
    if curve.key_size <= 256:
        return hashes.SHA256()
    return hashes.SHA384() if curve.key_size <= 384 else hashes.SHA512()


def sign_rotation(private_key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA signature (DER) of `message` by the institution's current key."""
    return private_key.sign(message, ec.ECDSA(_hash(private_key.curve)))


def rotation_signature_valid(public_key_openssh: bytes, message: bytes, signature: bytes) -> bool:
    """True if `signature` over `message` was made by the key `public_key_openssh` names."""
    try:
        key = serialization.load_ssh_public_key(public_key_openssh.strip())
    except (ValueError, UnsupportedAlgorithm):
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(signature, message, ec.ECDSA(_hash(key.curve)))
    except InvalidSignature:
        return False
    return True
