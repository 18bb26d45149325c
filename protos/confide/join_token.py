"""The join token, shared by the coordinator (which issues it) and institutions (which redeem it).

A token reads `confide1.<id>.<secret>.<ca-sha256>`: a 16-hex-digit id, a 43-character base64url
secret, and the SHA-256 (hex, of the DER encoding) of the coordinator's CA certificate, which
lets the institution check it reached the coordinator that issued the token before trusting it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from confide.common.errors import TokenError

PREFIX = "confide1"
_TOKEN = re.compile(r"^confide1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\.([0-9a-f]{64})$")


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    secret: str
    ca_fingerprint: str

    def __str__(self) -> str:
        return f"{PREFIX}.{self.token_id}.{self.secret}.{self.ca_fingerprint}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        match = _TOKEN.match(text.strip())
        if not match:
            raise TokenError(
                "malformed join token: expected confide1.<16 hex>.<43 base64url>.<64 hex>, "
                "as printed by `confide-server token create`"
            )
        return cls(*match.groups())


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER encoding as lowercase hex (`openssl x509 -fingerprint -sha256`,
    without colons)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
