"""The enrollment service over real TLS on 127.0.0.1: token redemption and key checks."""

from __future__ import annotations

import datetime
import ssl

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc
from confide.server import pki
from confide.server.enrollment import EnrollmentService, RegistrationError, serve
from confide.server.state import open_database
from confide.server.tokens import create_token

DAY = datetime.timedelta(days=1)


class RecordingRegistrar:
    """Stands in for the SuperLink (tested against a real one in the e2e suite)."""

    def __init__(self) -> None:
        self.registered: list[tuple[bytes, str]] = []
        self.refuse = False

    def register(self, public_key_openssh: bytes, institution: str) -> int:
        if self.refuse:
            raise RegistrationError("key already registered")
        self.registered.append((public_key_openssh, institution))
        return 1000 + len(self.registered)


def openssh_public_key(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


@pytest.fixture
def coordinator(tmp_path):
    ca_key, ca = pki.create_ca()
    server_key, server = pki.issue_server_certificate(ca_key, ca, ["localhost", "127.0.0.1"])
    pki.write_certificate(tmp_path / "ca.pem", ca)
    pki.write_certificate(tmp_path / "server.pem", server, ca)
    pki.write_private_key(tmp_path / "server.key", server_key)
    engine = open_database(f"sqlite:///{tmp_path}/confide.db")
    registrar = RecordingRegistrar()
    service = EnrollmentService(tmp_path / "ca.pem", engine, registrar, "127.0.0.1:9091")
    server_handle, port = serve(
        service, "127.0.0.1:0", tmp_path / "server.key", tmp_path / "server.pem"
    )
    yield {
        "port": port,
        "ca": ca,
        "engine": engine,
        "registrar": registrar,
        "fingerprint": pki.fingerprint(ca),
    }
    server_handle.stop(0)
    engine.dispose()


def stub(port: int, roots: bytes) -> enrollment_pb2_grpc.EnrollmentStub:
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=roots)
    )
    return enrollment_pb2_grpc.EnrollmentStub(channel)


def verified_stub(coordinator) -> enrollment_pb2_grpc.EnrollmentStub:
    return stub(coordinator["port"], pki.pem(coordinator["ca"]))


def test_bootstrap_channel_yields_the_ca_matching_the_token_fingerprint(coordinator):
    leaf = ssl.get_server_certificate(("127.0.0.1", coordinator["port"])).encode()
    reply = stub(coordinator["port"], leaf).GetCaCertificate(
        enrollment_pb2.GetCaCertificateRequest(), timeout=10
    )
    ca = x509.load_pem_x509_certificate(reply.ca_certificate_pem)
    assert pki.fingerprint(ca) == coordinator["fingerprint"]
    x509.load_pem_x509_certificate(leaf).verify_directly_issued_by(ca)


def test_register_redeems_the_token_once_and_registers_the_key(coordinator):
    token = create_token(coordinator["engine"], "hospital-a", DAY, coordinator["fingerprint"])
    key = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    request = enrollment_pb2.RegisterRequest(token=str(token), public_key_openssh=key)
    reply = verified_stub(coordinator).Register(request, timeout=10)
    assert (reply.institution, reply.node_id) == ("hospital-a", 1001)
    assert reply.superlink_address == "127.0.0.1:9091"
    assert coordinator["registrar"].registered == [(key, "hospital-a")]
    with pytest.raises(grpc.RpcError) as again:
        verified_stub(coordinator).Register(request, timeout=10)
    assert again.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in again.value.details()


def test_token_of_another_coordinator_is_refused(coordinator):
    token = create_token(coordinator["engine"], "hospital-a", DAY, "0" * 64)
    key = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(grpc.RpcError) as refused:
        verified_stub(coordinator).Register(
            enrollment_pb2.RegisterRequest(token=str(token), public_key_openssh=key), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "another coordinator" in refused.value.details()


@pytest.mark.parametrize(
    "key",
    [
        b"not a key",
        openssh_public_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ],
)
def test_bad_public_key_is_refused_and_the_token_stays_valid(coordinator, key):
    token = create_token(coordinator["engine"], "hospital-a", DAY, coordinator["fingerprint"])
    with pytest.raises(grpc.RpcError) as refused:
        verified_stub(coordinator).Register(
            enrollment_pb2.RegisterRequest(token=str(token), public_key_openssh=key), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    good = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    reply = verified_stub(coordinator).Register(
        enrollment_pb2.RegisterRequest(token=str(token), public_key_openssh=good), timeout=10
    )
    assert reply.institution == "hospital-a"


def test_superlink_refusal_is_reported_and_the_token_stays_valid(coordinator):
    token = create_token(coordinator["engine"], "hospital-a", DAY, coordinator["fingerprint"])
    key = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    request = enrollment_pb2.RegisterRequest(token=str(token), public_key_openssh=key)
    coordinator["registrar"].refuse = True
    with pytest.raises(grpc.RpcError) as refused:
        verified_stub(coordinator).Register(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already registered" in refused.value.details()
    coordinator["registrar"].refuse = False
    assert verified_stub(coordinator).Register(request, timeout=10).institution == "hospital-a"


def test_malformed_token_is_unauthenticated(coordinator):
    with pytest.raises(grpc.RpcError) as refused:
        verified_stub(coordinator).Register(
            enrollment_pb2.RegisterRequest(token="hello", public_key_openssh=b""), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_client_is_refused(coordinator):
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator['port']}")
    with pytest.raises(grpc.RpcError) as refused:
        enrollment_pb2_grpc.EnrollmentStub(channel).GetCaCertificate(
            enrollment_pb2.GetCaCertificateRequest(), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
