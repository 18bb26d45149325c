"""The enrollment service: institutions redeem join tokens and register their public keys.

The service runs next to the SuperLink, over TLS with the same server certificate. It never
sees an institution's private key or data: a `Register` call carries the join token and the
institution's public key, which the coordinator registers with the SuperLink so that the
institution's SuperNode can authenticate. A `RotateKey` call replaces that key with a new one,
signed with the current key (`confide.protos.key_rotation`), so an institution keeps its name,
its folder and its privacy ledger when its key changes. A rotation cut short is finished by the
next request for the same new key, signed with the current key or with that new key itself.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol

import grpc
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine

from confide.protos.key_rotation import (
    MAX_CLOCK_SKEW,
    rotation_message,
    rotation_signature_valid,
)
from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc
from confide.server.flower import CONNECTION, FlowerError, flwr_json
from confide.server.institutions import (
    InstitutionError,
    KeyRegistry,
    RotationRefused,
    RotationUnfinished,
    enrolled,
    enrolled_key,
    pending_key,
    record_enrollment,
    rotate_key,
)
from confide.server.pki import fingerprint, load_certificate
from confide.server.tokens import JoinToken, TokenError, redeem_token, release_token

NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class RegistrationError(RuntimeError):
    """The SuperLink did not register the key; the message says why."""


class Registrar(KeyRegistry, Protocol):
    """What the service needs of the SuperLink: `FlowerRegistrar`, or a stand-in in tests."""


class FlowerRegistrar:
    """Registers and unregisters keys through `flwr supernode ...`, Flower's own Control API
    client, against the coordinator's own SuperLink (`confide.server.flower`)."""

    def __init__(self, flwr_home: Path, timeout: float = 60.0) -> None:
        self.flwr_home = flwr_home
        self.timeout = timeout

    def _flwr(self, *args: str) -> dict[str, Any]:
        try:
            return flwr_json(self.flwr_home, *args, timeout=self.timeout)
        except FlowerError as error:
            raise RegistrationError(str(error)) from None

    def register(self, public_key_openssh: bytes, institution: str) -> int:
        with tempfile.TemporaryDirectory() as scratch:
            key_file = Path(scratch) / f"{institution}.pub"
            key_file.write_bytes(public_key_openssh)
            reply = self._flwr(
                "supernode", "register", str(key_file), CONNECTION, "--name", institution
            )
        return int(reply["node-id"])

    def unregister(self, node_id: int) -> None:
        self._flwr("supernode", "unregister", str(node_id), CONNECTION)

    def statuses(self) -> dict[int, str]:
        """Node id -> status (`registered`, `online`, `offline`, `unregistered`)."""
        reply = self._flwr("supernode", "list", CONNECTION)
        return {int(node["node-id"]): node["status"] for node in reply.get("nodes", [])}


def check_public_key(data: bytes) -> None:
    """An OpenSSH-format EC public key on a NIST curve, as Flower's node auth requires."""
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not an OpenSSH public key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise ValueError("the key must be an EC key on a NIST curve (P-256, P-384 or P-521)")


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(
        self, ca_certificate: Path, engine: Engine, registrar: Registrar, superlink_address: str
    ) -> None:
        self.ca_pem = ca_certificate.read_bytes()
        self.ca_fingerprint = fingerprint(load_certificate(ca_certificate))
        self.engine = engine
        self.registrar = registrar
        self.superlink_address = superlink_address
        # One rotation at a time: two requests must not both find the same key current.
        self._rotating = threading.Lock()

    def GetCaCertificate(
        self, request: enrollment_pb2.GetCaCertificateRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.GetCaCertificateResponse:
        return enrollment_pb2.GetCaCertificateResponse(ca_certificate_pem=self.ca_pem)

    def Register(
        self, request: enrollment_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.RegisterResponse:
        try:
            token = JoinToken.parse(request.token)
        except TokenError as error:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        if token.ca_fingerprint != self.ca_fingerprint:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this token was issued by another coordinator (CA fingerprint differs)",
            )
        try:
            check_public_key(request.public_key_openssh)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            institution = redeem_token(self.engine, token)
        except TokenError as error:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        if enrolled(self.engine, institution):
            release_token(self.engine, token)
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{institution} is already enrolled; revoke it first to enroll a new key",
            )
        try:
            node_id = self.registrar.register(request.public_key_openssh, institution)
        except RegistrationError as error:
            release_token(self.engine, token)  # nothing was registered: the token stays valid
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"SuperLink refused: {error}")
        record_enrollment(self.engine, institution, node_id, request.public_key_openssh)
        return enrollment_pb2.RegisterResponse(
            institution=institution, node_id=node_id, superlink_address=self.superlink_address
        )

    def RotateKey(
        self, request: enrollment_pb2.RotateKeyRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.RotateKeyResponse:
        """Replace the caller's key, once it proved it holds the current one."""
        try:
            with self._rotating:
                node_id = self._rotate(request)
        except _Refused as refusal:
            context.abort(refusal.code, str(refusal))
        return enrollment_pb2.RotateKeyResponse(
            institution=request.institution,
            node_id=node_id,
            superlink_address=self.superlink_address,
        )

    def _rotate(self, request: enrollment_pb2.RotateKeyRequest) -> int:
        """Refusals (nothing changed) are FAILED_PRECONDITION, UNAUTHENTICATED or
        INVALID_ARGUMENT; a rotation that started and did not finish is ABORTED, and the same
        request again finishes it."""
        name, new = request.institution, request.new_public_key_openssh
        try:
            check_public_key(new)
        except ValueError as error:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        old, node_id = self._authenticate(request)
        if new.strip() == old.strip():
            return node_id  # already rotated: a retry whose first reply was lost
        try:
            return rotate_key(self.engine, self.registrar, name, old=old, new=new)
        except RotationRefused as error:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None
        except RotationUnfinished as error:
            raise _Refused(grpc.StatusCode.ABORTED, str(error)) from None
        except InstitutionError as error:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, str(error)) from None

    def _authenticate(self, request: enrollment_pb2.RotateKeyRequest) -> tuple[bytes, int]:
        """The key and node id the institution is enrolled with, if the request is signed,
        for this coordinator and recently, with that key — or with the new key it names when
        a rotation to that key is under way (a retry that finishes it)."""
        name = request.institution
        current = enrolled_key(self.engine, name)
        if current is None:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{name!r} is not enrolled here (unknown or revoked): join with a new token",
            )
        message = rotation_message(
            institution=name,
            new_public_key=request.new_public_key_openssh,
            ca_fingerprint=self.ca_fingerprint,
            timestamp=request.timestamp,
        )
        signers = [current[0]]
        pending = pending_key(self.engine, name)
        if pending is not None and pending.strip() == request.new_public_key_openssh.strip():
            signers.append(pending)
        if not any(rotation_signature_valid(key, message, request.signature) for key in signers):
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the signature does not match the key {name} is enrolled with",
            )
        skew = abs(time.time() - request.timestamp)
        if skew > MAX_CLOCK_SKEW:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the request was signed {skew:.0f} s away from the coordinator's clock (at "
                f"most {MAX_CLOCK_SKEW} s allowed): check the institution's clock",
            )
        return current


class _Refused(Exception):
    """A request the service answers with `code` and the message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def serve(
    service: EnrollmentService, address: str, server_key: Path, server_certificate: Path
) -> tuple[grpc.Server, int]:
    """Start the service over TLS on `address` (`HOST:PORT`, port 0 = any); return the port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(service, server)
    credentials = grpc.ssl_server_credentials(
        [(server_key.read_bytes(), server_certificate.read_bytes())]
    )
    port = server.add_secure_port(address, credentials)
    server.start()
    return server, port
