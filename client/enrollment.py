"""Joining a coordinator with a join token, without trusting it blindly.

1. Make the institution's key pair here; the private key never leaves this host.
2. Read the server's certificate and open a bootstrap channel that trusts exactly it; ask for
   the CA certificate.
3. Accept the CA only if its SHA-256 matches the token's fingerprint and it issued the server's
   certificate; a man in the middle cannot forge either.
4. Over a channel that trusts only that CA, redeem the token and register the public key.

Rotating the key later (`rotate_key`) keeps the folder: a new key pair is made and staged
here, the coordinator is asked over a channel that trusts only the saved CA to replace the
current key (the request is signed with it), and the new keys are put in place only then. A
staged key that an earlier attempt sent is never deleted here: the coordinator may hold it.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confide.client.institution import InstitutionDir
from confide.common.errors import JoinError, RotationError
from confide.common.files import write_atomic
from confide.protos.join_token import JoinToken, certificate_fingerprint
from confide.protos.key_rotation import rotation_message, sign_rotation
from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc

TIMEOUT = 60.0
# A TLS server answers a handshake in well under a second, even far away; an address that
# accepts connections but stays silent (plaintext, or nothing listening behind a proxy) is
# refused after this long rather than after a full minute.
HANDSHAKE_TIMEOUT = 15.0


Reply = TypeVar("Reply")


# Answers after which the coordinator certainly did not take the new key (it answers a
# rotation it started and did not finish with ABORTED, which is not among them).
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}


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


def _public_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def _write_key_pair(private: Path, public: Path) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new EC P-384 pair in OpenSSH format (what Flower's node authentication reads); the
    private key file is 0600 from its first byte."""
    key = ec.generate_private_key(ec.SECP384R1())
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write_atomic(private, data, 0o600)
    write_atomic(public, _public_openssh(key) + b"\n", 0o644)
    return key, _public_openssh(key)


def create_key_pair(directory: InstitutionDir) -> bytes:
    """The institution's key pair in its folder; returns the public key."""
    return _write_key_pair(directory.private_key, directory.public_key)[1]


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


def _call(
    server: str, ca_pem: bytes, call: Callable[[enrollment_pb2_grpc.EnrollmentStub], Reply]
) -> Reply:
    """One call over a channel that trusts only the coordinator's CA (grpc.RpcError on error)."""
    host, port = _split(server)
    channel = grpc.secure_channel(f"{host}:{port}", grpc.ssl_channel_credentials(ca_pem))
    try:
        return call(enrollment_pb2_grpc.EnrollmentStub(channel))
    finally:
        channel.close()


def register(server: str, *, ca_pem: bytes, token: JoinToken, public_key: bytes) -> Enrollment:
    request = enrollment_pb2.RegisterRequest(token=str(token), public_key_openssh=public_key)
    try:
        reply = _call(server, ca_pem, lambda stub: stub.Register(request, timeout=TIMEOUT))
    except grpc.RpcError as error:
        raise JoinError(f"the coordinator refused: {error.details()}") from None
    return Enrollment(reply.institution, reply.node_id, reply.superlink_address)


def join(server: str, token_text: str, directory: InstitutionDir) -> Enrollment:
    """Verify the coordinator, make a key pair and register it; save the CA. The caller saves
    the institution's settings."""
    try:
        token = JoinToken.parse(token_text)
    except ValueError as error:
        raise JoinError(str(error)) from error
    ca_pem = fetch_trusted_ca(server, token)
    directory.root.mkdir(parents=True, exist_ok=True)
    directory.root.chmod(0o700)
    public_key = create_key_pair(directory)
    enrollment = register(server, ca_pem=ca_pem, token=token, public_key=public_key)
    write_atomic(directory.ca_certificate, ca_pem)
    return enrollment


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An institution's OpenSSH private key; its content never appears in an error."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise RotationError(f"{path}: no such key file; nothing was changed") from None
    except (OSError, ValueError, TypeError) as error:
        raise RotationError(f"{path}: not a usable private key ({type(error).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RotationError(f"{path}: not an EC private key")
    return key


def _staged_key(directory: InstitutionDir) -> tuple[ec.EllipticCurvePrivateKey, bytes, bool]:
    """The next key pair: the one a previous, interrupted rotation staged (True), else a new
    one (False). Staged beside the current keys, so a rotation cut short loses no key."""
    if directory.next_private_key.is_file():
        key = _load_key(directory.next_private_key)
        # Written again: a rotation cut short between the two files may have left none.
        write_atomic(directory.next_public_key, _public_openssh(key) + b"\n", 0o644)
        return key, _public_openssh(key), True
    return (*_write_key_pair(directory.next_private_key, directory.next_public_key), False)


def _request_rotation(
    server: str, ca_pem: bytes, institution: str, new_key: bytes, signer: ec.EllipticCurvePrivateKey
) -> Enrollment:
    """Ask the coordinator to replace `institution`'s key with `new_key`, signed by `signer`."""
    ca_fingerprint = certificate_fingerprint(x509.load_pem_x509_certificate(ca_pem))
    timestamp = int(time.time())
    message = rotation_message(
        institution=institution,
        new_public_key=new_key,
        ca_fingerprint=ca_fingerprint,
        timestamp=timestamp,
    )
    request = enrollment_pb2.RotateKeyRequest(
        institution=institution,
        new_public_key_openssh=new_key,
        timestamp=timestamp,
        signature=sign_rotation(signer, message),
    )
    try:
        reply = _call(server, ca_pem, lambda stub: stub.RotateKey(request, timeout=TIMEOUT))
    except grpc.RpcError as error:
        raise RotationError(
            f"{server}: the coordinator did not rotate the key: {error.details()}",
            refused=error.code() in _REFUSALS,
        ) from None
    return Enrollment(reply.institution, reply.node_id, reply.superlink_address)


def rotate_key(directory: InstitutionDir, institution: str, server: str) -> Enrollment:
    """Replace the institution's key in place: stage a new pair, have the coordinator register
    it (signed with the current key) and unregister the old one, then put it in place.

    If a previous rotation staged a key, the coordinator may hold it (a lost reply, or a
    rotation it did not finish): the request is made again for that key, signed with the
    current key and then with the staged key itself.
    """
    try:
        ca_pem = directory.ca_certificate.read_bytes()
    except OSError as error:
        raise RotationError(
            f"{directory.ca_certificate}: cannot read the saved CA: {error}"
        ) from None
    current = _load_key(directory.private_key)
    staged, new_key, resumed = _staged_key(directory)
    failures: list[RotationError] = []
    for signer in (current, staged) if resumed else (current,):
        try:
            enrollment = _request_rotation(server, ca_pem, institution, new_key, signer)
            break
        except RotationError as error:
            failures.append(error)
    else:
        raise _rotation_failed(directory, failures, resumed=resumed)
    # The private key first: it is what the SuperNode authenticates with.
    os.replace(directory.next_private_key, directory.private_key)
    os.replace(directory.next_public_key, directory.public_key)
    return enrollment


def _rotation_failed(
    directory: InstitutionDir, failures: list[RotationError], *, resumed: bool
) -> RotationError:
    """What went wrong and what to do. The staged key is deleted only when this attempt made
    it and the coordinator refused it (it never registered it); one an earlier attempt sent
    may be held by the coordinator, so it stays, and the operator is told what to do."""
    staged = directory.next_private_key
    details = "; ".join(dict.fromkeys(str(failure) for failure in failures))
    if not resumed and all(failure.refused for failure in failures):
        staged.unlink(missing_ok=True)
        directory.next_public_key.unlink(missing_ok=True)
        return RotationError(f"{details}; the current key stays in use", refused=True)
    if resumed:
        advice = (
            f"The new key {staged} was sent by an earlier attempt and is kept: the "
            "coordinator may hold it. Run rotate-key again once the cause above is fixed; "
            f"delete {staged.name} and {directory.next_public_key.name} (rotate-key then makes "
            "a new key) only if the coordinator's answer says that key cannot be used, or its "
            "operator confirms it does not hold it."
        )
    else:
        advice = (
            f"The new key stays staged in {staged}: run rotate-key again to finish (the "
            "coordinator may have taken it); until then the current key stays in use unless "
            "the coordinator's answer above says otherwise."
        )
    return RotationError(f"{details}. {advice}", refused=all(f.refused for f in failures))
