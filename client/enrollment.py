"""Joining a coordinator with a join token, without trusting it blindly.

1. Make the institution's key pair here; the private key never leaves this host.
2. Read the server's certificate and open a bootstrap channel that trusts exactly it; ask for
   the CA certificate.
3. Accept the CA only if its SHA-256 matches the token's fingerprint and it issued the server's
   certificate; a man in the middle cannot forge either.
4. Over a channel that trusts only that CA, redeem the token and register the public key.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confide.client.institution import InstitutionDir
from confide.protos.join_token import JoinToken, certificate_fingerprint
from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc
from confide.tasks.files import write_atomic

TIMEOUT = 60.0
# A TLS server answers a handshake in well under a second, even far away; an address that
# accepts connections but stays silent (plaintext, or nothing listening behind a proxy) is
# refused after this long rather than after a full minute.
HANDSHAKE_TIMEOUT = 15.0


class JoinError(RuntimeError):
    """Joining failed; nothing was registered unless the message says so."""


@dataclass(frozen=True)
class Enrollment:
    institution: str
    node_id: int
    superlink: str


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise JoinError(f"--server {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def create_key_pair(directory: InstitutionDir) -> bytes:
    """EC P-384 in OpenSSH format (what Flower's node authentication reads); returns the
    public key. The private key file is 0600 from its first byte."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_atomic(directory.private_key, private, 0o600)
    write_atomic(directory.public_key, public + b"\n", 0o644)
    return public


def fetch_trusted_ca(server: str, token: JoinToken) -> bytes:
    """The coordinator's CA certificate (PEM), verified against the token; refuses otherwise."""
    host, port = _split(server)
    try:
        leaf_pem = ssl.get_server_certificate((host, port), timeout=HANDSHAKE_TIMEOUT)
    except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as error:
        raise JoinError(
            f"{server}: no TLS server there ({error}); confide never enrolls over plaintext"
        ) from None
    bootstrap = grpc.secure_channel(
        f"{host}:{port}",
        grpc.ssl_channel_credentials(root_certificates=leaf_pem.encode()),
    )
    try:
        reply = enrollment_pb2_grpc.EnrollmentStub(bootstrap).GetCaCertificate(
            enrollment_pb2.GetCaCertificateRequest(), timeout=TIMEOUT
        )
    except grpc.RpcError as error:
        raise JoinError(
            f"{server}: the enrollment service did not answer: {error.details()}"
        ) from None
    finally:
        bootstrap.close()
    ca = x509.load_pem_x509_certificate(reply.ca_certificate_pem)
    actual = certificate_fingerprint(ca)
    if actual != token.ca_fingerprint:
        raise JoinError(
            f"CA fingerprint mismatch: the token expects {token.ca_fingerprint}, {server} "
            f"presents {actual}. This is not the coordinator that issued the token; nothing "
            "was registered."
        )
    try:
        x509.load_pem_x509_certificate(leaf_pem.encode()).verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise JoinError(f"{server}: its certificate was not issued by the token's CA") from None
    return reply.ca_certificate_pem


def register(server: str, ca_pem: bytes, token: JoinToken, public_key: bytes) -> Enrollment:
    host, port = _split(server)
    channel = grpc.secure_channel(f"{host}:{port}", grpc.ssl_channel_credentials(ca_pem))
    try:
        reply = enrollment_pb2_grpc.EnrollmentStub(channel).Register(
            enrollment_pb2.RegisterRequest(token=str(token), public_key_openssh=public_key),
            timeout=TIMEOUT,
        )
    except grpc.RpcError as error:
        raise JoinError(f"the coordinator refused: {error.details()}") from None
    finally:
        channel.close()
    return Enrollment(reply.institution, reply.node_id, reply.superlink_address)


def join(server: str, token_text: str, directory: InstitutionDir) -> Enrollment:
    """Verify the coordinator, make a key pair and register it; save the CA. The caller saves
    the institution's settings."""
    try:
        token = JoinToken.parse(token_text)
    except ValueError as error:
        raise JoinError(str(error)) from None
    ca_pem = fetch_trusted_ca(server, token)
    directory.root.mkdir(parents=True, exist_ok=True)
    directory.root.chmod(0o700)
    public_key = create_key_pair(directory)
    enrollment = register(server, ca_pem, token, public_key)
    write_atomic(directory.ca_certificate, ca_pem)
    return enrollment
