"""The enrollment service: institutions redeem join tokens and register their public keys.

The service runs next to the SuperLink, over TLS with the same server certificate. It never
sees an institution's private key or data: a `Register` call carries the join token and the
institution's public key, which the coordinator registers with the SuperLink so that the
institution's SuperNode can authenticate. A `RotateKey` call replaces that key with a new one,
signed with the current key (`confide.protos.key_rotation`), so an institution keeps its name,
its folder and its privacy ledger when its key changes. A rotation cut short is finished by the
next request for the same new key, signed with the current key or with that new key itself.

Every join and key change is written to the coordinator's audit log (`confide.server.audit`):
`token.redeemed` and `institution.registered` for a join, `token.refused` with the reason and
the caller's address for each refused one, `institution.key-rotated` for a rotation. A log
that cannot be written does not stop the service, nor fail a join that succeeded: the
failure is logged as a warning (see `confide-server audit verify`).

Refusals are rate-limited per address (`confide.server.tokens.RedemptionLimiter`: 5, then one
every 12 s): every refused `Register`, whatever the reason (a bad key, an unknown, used or
foreign token, an institution already enrolled, the SuperLink refusing), and every `RotateKey`
refused before its signature proved who is calling. A refused join leaves nothing spent (its
token is valid again), so only the limit keeps one address from writing `token.refused`
entries without end; the audit log grows by at most the limiter's rate per address. While an
address is limited, its `Register` and `RotateKey` calls are answered RESOURCE_EXHAUSTED
before anything is looked at, and not audited.

Joins for one institution are serialized (a lock per institution name, in this process: one
coordinator serves enrollment for a state folder, `STATE/coordinator.pid`): two valid tokens
for the same institution redeemed at once must not both register a key with the SuperLink,
as the database keeps one and `institutions revoke` could not reach the other.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn, Protocol

import grpc
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine

from confide.common.errors import RegistrationError
from confide.protos.key_rotation import (
    MAX_CLOCK_SKEW,
    rotation_message,
    rotation_signature_valid,
)
from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc
from confide.server.audit import AuditError, AuditLog
from confide.server.flower import CONNECTION, FlowerError, flwr_json
from confide.server.institutions import (
    KeyRegistry,
    RotationRefused,
    RotationUnfinished,
    UnknownInstitution,
    enrolled,
    enrolled_key,
    pending_key,
    record_enrollment,
    rotate_key,
)
from confide.server.pki import fingerprint, load_certificate
from confide.server.tokens import (
    JoinToken,
    RedemptionLimiter,
    TokenError,
    redeem_token,
    release_token,
)

NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_log = logging.getLogger(__name__)


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
            raise RegistrationError(str(error)) from error

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


def key_fingerprint(public_key_openssh: bytes) -> str:
    """`SHA256:...` of an OpenSSH public key, as `ssh-keygen -l` prints it (for the audit
    log, which names keys, never stores them)."""
    try:
        blob = base64.b64decode(public_key_openssh.split()[1], validate=True)
    except (IndexError, ValueError):
        blob = public_key_openssh
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def peer_address(peer: str) -> str:
    """The caller's address without its port (`ipv4:10.0.0.5:51234` -> `10.0.0.5`): a new
    connection must not be a new caller to the rate limit."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(
        self,
        ca_certificate: Path,
        engine: Engine,
        registrar: Registrar,
        superlink_address: str,
        *,
        audit: AuditLog | None = None,
        limiter: RedemptionLimiter | None = None,
    ) -> None:
        self.ca_pem = ca_certificate.read_bytes()
        self.ca_fingerprint = fingerprint(load_certificate(ca_certificate))
        self.engine = engine
        self.registrar = registrar
        self.superlink_address = superlink_address
        self.audit = audit
        self.limiter = limiter if limiter is not None else RedemptionLimiter()
        # One rotation at a time: two requests must not both find the same key current.
        self._rotating = threading.Lock()
        # One join at a time per institution (see the module docstring).
        self._joining: dict[str, threading.Lock] = {}
        self._joining_guard = threading.Lock()

    def _join_lock(self, institution: str) -> threading.Lock:
        """The lock of `institution`'s joins (names come from redeemed tokens: few)."""
        with self._joining_guard:
            return self._joining.setdefault(institution, threading.Lock())

    def _record(self, action: str, *, actor: str, **details: str | int | None) -> None:
        """Append to the audit log, if any; a failure is logged, never the caller's answer."""
        if self.audit is None:
            return
        try:
            self.audit.append(action, actor=actor, **details)
        except AuditError as error:
            _log.warning("audit log not written (%s %s): %s", action, details, error)

    def _limit(self, context: grpc.ServicerContext, peer: str) -> None:
        """RESOURCE_EXHAUSTED, before anything else, while `peer` used up its refusals."""
        wait = self.limiter.retry_after(peer)
        if wait > 0:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many refused requests from {peer}: try again in {math.ceil(wait)} s",
            )

    def _refuse(
        self,
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        reason: str,
        *,
        peer: str,
        token: JoinToken | None = None,
        institution: str | None = None,
    ) -> NoReturn:
        """Audit a refused join and abort it; every refusal counts against the address."""
        details = {"reason": reason, "peer": peer, "institution": institution}
        if token is not None:
            details["token_id"] = token.token_id
        if self.limiter.failed(peer):
            wait = math.ceil(self.limiter.retry_after(peer))
            details["reason"] = f"{reason}; further joins from {peer} refused for {wait} s"
        actor = f"institution:{institution}" if institution else f"peer:{peer}"
        self._record("token.refused", actor=actor, **details)
        context.abort(code, reason)
        raise AssertionError("unreachable: context.abort raises")

    def GetCaCertificate(
        self, request: enrollment_pb2.GetCaCertificateRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.GetCaCertificateResponse:
        return enrollment_pb2.GetCaCertificateResponse(ca_certificate_pem=self.ca_pem)

    def Register(
        self, request: enrollment_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.RegisterResponse:
        peer = peer_address(context.peer())
        self._limit(context, peer)
        token = self._token(request, context, peer)
        try:
            check_public_key(request.public_key_openssh)
        except ValueError as error:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), peer=peer)
        try:
            institution = redeem_token(self.engine, token)
        except TokenError as error:
            self._refuse(
                context, grpc.StatusCode.UNAUTHENTICATED, str(error), peer=peer, token=token
            )
        with self._join_lock(institution):
            node_id = self._register(
                request, context, token=token, institution=institution, peer=peer
            )
            record_enrollment(
                self.engine,
                name=institution,
                node_id=node_id,
                public_key=request.public_key_openssh,
            )
        actor = f"institution:{institution}"
        self._record(
            "token.redeemed",
            actor=actor,
            institution=institution,
            token_id=token.token_id,
            peer=peer,
        )
        self._record(
            "institution.registered",
            actor=actor,
            institution=institution,
            node_id=node_id,
            key_fingerprint=key_fingerprint(request.public_key_openssh),
        )
        return enrollment_pb2.RegisterResponse(
            institution=institution, node_id=node_id, superlink_address=self.superlink_address
        )

    def _token(
        self, request: enrollment_pb2.RegisterRequest, context: grpc.ServicerContext, peer: str
    ) -> JoinToken:
        """The request's token, if it is one and this coordinator issued it."""
        try:
            token = JoinToken.parse(request.token)
        except TokenError as error:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(error), peer=peer)
        if token.ca_fingerprint != self.ca_fingerprint:
            self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "this token was issued by another coordinator (CA fingerprint differs)",
                peer=peer,
                token=token,
            )
        return token

    def _register(
        self,
        request: enrollment_pb2.RegisterRequest,
        context: grpc.ServicerContext,
        *,
        token: JoinToken,
        institution: str,
        peer: str,
    ) -> int:
        """Register the key with the SuperLink; on a refusal the token is valid again. Under
        the institution's join lock, so `enrolled` is current until the key is recorded."""
        refusal = None
        if enrolled(self.engine, institution):
            refusal = f"{institution} is already enrolled; revoke it first to enroll a new key"
        else:
            try:
                return self.registrar.register(request.public_key_openssh, institution)
            except RegistrationError as error:
                refusal = f"SuperLink refused: {error}"
        release_token(self.engine, token)  # nothing was registered
        self._refuse(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            refusal,
            peer=peer,
            token=token,
            institution=institution,
        )

    def RotateKey(
        self, request: enrollment_pb2.RotateKeyRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.RotateKeyResponse:
        """Replace the caller's key, once it proved it holds the current one."""
        peer = peer_address(context.peer())
        self._limit(context, peer)
        try:
            with self._rotating:
                node_id, rotated = self._rotate(request)
        except _Refused as refusal:
            if refusal.unauthenticated:
                self.limiter.failed(peer)
            context.abort(refusal.code, str(refusal))
        if rotated:
            self._record(
                "institution.key-rotated",
                actor=f"institution:{request.institution}",
                institution=request.institution,
                node_id=node_id,
                key_fingerprint=key_fingerprint(request.new_public_key_openssh),
                peer=peer,
            )
        return enrollment_pb2.RotateKeyResponse(
            institution=request.institution,
            node_id=node_id,
            superlink_address=self.superlink_address,
        )

    def _rotate(self, request: enrollment_pb2.RotateKeyRequest) -> tuple[int, bool]:
        """(the node id, whether the key changed now). Refusals (nothing changed) are
        FAILED_PRECONDITION, UNAUTHENTICATED or INVALID_ARGUMENT; a rotation that started and
        did not finish is ABORTED, and the same request again finishes it."""
        name, new = request.institution, request.new_public_key_openssh
        try:
            check_public_key(new)
        except ValueError as error:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error), before=True) from None
        old, node_id = self._authenticate(request)
        if new.strip() == old.strip():
            return node_id, False  # already rotated: a retry whose first reply was lost
        try:
            return rotate_key(self.engine, self.registrar, name, old=old, new=new), True
        except RotationRefused as error:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None
        except RotationUnfinished as error:
            raise _Refused(grpc.StatusCode.ABORTED, str(error)) from None
        except UnknownInstitution as error:
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
    """A request the service answers with `code` and the message; `unauthenticated`: refused
    before the caller proved who it is (counted by the rate limit)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, before: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.unauthenticated = before or code == grpc.StatusCode.UNAUTHENTICATED


def serve(
    service: EnrollmentService, address: str, *, server_key: Path, server_certificate: Path
) -> tuple[grpc.Server, int]:
    """Start the service over TLS on `address` (`HOST:PORT`, port 0 = any); return the port.

    gRPC sets SO_REUSEPORT by default, which lets a second coordinator bind the same port and
    take half of the calls; it is turned off, so a taken port is an error (`OSError`)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
    )
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(service, server)
    credentials = grpc.ssl_server_credentials(
        [(server_key.read_bytes(), server_certificate.read_bytes())]
    )
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as error:  # grpcio raises where older versions returned 0
        raise OSError(f"cannot listen on {address}: {error}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use?)")
    server.start()
    return server, port
