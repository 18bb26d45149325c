"""The enrollment service over real TLS on 127.0.0.1: token redemption and key checks."""

from __future__ import annotations

import datetime
import ssl
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from confide.protos.key_rotation import rotation_message, sign_rotation
from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc
from confide.server import pki
from confide.server.institutions import enrolled_key, revoke
from confide.server.tokens import create_token

DAY = datetime.timedelta(days=1)


def openssh_public_key(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


@pytest.fixture
def coordinator(enrollment_coordinator):
    return enrollment_coordinator


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
    token = create_token(
        coordinator["engine"], "hospital-a", ttl=DAY, ca_fingerprint=coordinator["fingerprint"]
    )
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
    token = create_token(coordinator["engine"], "hospital-a", ttl=DAY, ca_fingerprint="0" * 64)
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
    token = create_token(
        coordinator["engine"], "hospital-a", ttl=DAY, ca_fingerprint=coordinator["fingerprint"]
    )
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
    token = create_token(
        coordinator["engine"], "hospital-a", ttl=DAY, ca_fingerprint=coordinator["fingerprint"]
    )
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


# -- key rotation -------------------------------------------------------------------------
def enroll(coordinator, name: str = "hospital-a") -> tuple[ec.EllipticCurvePrivateKey, int]:
    """An institution enrolled with a token; its private key and node id."""
    key = ec.generate_private_key(ec.SECP384R1())
    token = create_token(
        coordinator["engine"], name, ttl=DAY, ca_fingerprint=coordinator["fingerprint"]
    )
    request = enrollment_pb2.RegisterRequest(
        token=str(token), public_key_openssh=openssh_public_key(key)
    )
    return key, verified_stub(coordinator).Register(request, timeout=10).node_id


def rotation(
    coordinator,
    new_key: bytes,
    signer: ec.EllipticCurvePrivateKey,
    *,
    name: str = "hospital-a",
    timestamp: int | None = None,
    ca_fingerprint: str | None = None,
) -> enrollment_pb2.RotateKeyRequest:
    """A rotation request signed as an institution signs it."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    message = rotation_message(
        institution=name,
        new_public_key=new_key,
        ca_fingerprint=ca_fingerprint or coordinator["fingerprint"],
        timestamp=timestamp,
    )
    return enrollment_pb2.RotateKeyRequest(
        institution=name,
        new_public_key_openssh=new_key,
        timestamp=timestamp,
        signature=sign_rotation(signer, message),
    )


def refused(coordinator, request: enrollment_pb2.RotateKeyRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refusal:
        verified_stub(coordinator).RotateKey(request, timeout=10)
    return refusal.value


def test_a_rotation_signed_with_the_current_key_replaces_it_and_its_replay_fails(coordinator):
    old, old_node = enroll(coordinator)
    new = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    request = rotation(coordinator, new, old)
    reply = verified_stub(coordinator).RotateKey(request, timeout=10)
    assert reply.institution == "hospital-a" and reply.node_id != old_node
    assert reply.superlink_address == "127.0.0.1:9091"
    registrar = coordinator["registrar"]
    assert registrar.registered[-1] == (new, "hospital-a")
    assert registrar.unregistered == [old_node]
    assert enrolled_key(coordinator["engine"], "hospital-a") == (new, reply.node_id)
    replay = refused(coordinator, request)
    assert replay.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not match" in replay.details()
    assert len(registrar.registered) == 2 and registrar.unregistered == [old_node]


def test_a_retry_signed_with_the_new_key_answers_the_current_node(coordinator):
    old, _ = enroll(coordinator)
    key = ec.generate_private_key(ec.SECP384R1())
    first = verified_stub(coordinator).RotateKey(
        rotation(coordinator, openssh_public_key(key), old), timeout=10
    )
    again = verified_stub(coordinator).RotateKey(
        rotation(coordinator, openssh_public_key(key), key), timeout=10
    )
    assert again.node_id == first.node_id and len(coordinator["registrar"].registered) == 2


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("another key signed", "signature does not match"),
        ("signed for another coordinator", "signature does not match"),
        ("signed ten minutes ago", "coordinator's clock"),
        ("signed ten minutes ahead", "coordinator's clock"),
    ],
)
def test_a_rotation_not_signed_now_with_the_current_key_for_this_coordinator_is_refused(
    coordinator, case: str, message: str
):
    old, node = enroll(coordinator)
    new = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    now = int(time.time())
    request = {
        "another key signed": lambda: rotation(
            coordinator, new, ec.generate_private_key(ec.SECP384R1())
        ),
        "signed for another coordinator": lambda: rotation(
            coordinator, new, old, ca_fingerprint="0" * 64
        ),
        "signed ten minutes ago": lambda: rotation(coordinator, new, old, timestamp=now - 600),
        "signed ten minutes ahead": lambda: rotation(coordinator, new, old, timestamp=now + 600),
    }[case]()
    refusal = refused(coordinator, request)
    assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED and message in refusal.details()
    assert enrolled_key(coordinator["engine"], "hospital-a") == (openssh_public_key(old), node)
    assert len(coordinator["registrar"].registered) == 1
    assert coordinator["registrar"].unregistered == []


@pytest.mark.parametrize("name", ["hospital-a", "hospital-z"], ids=["revoked", "unknown"])
def test_a_revoked_or_unknown_institution_cannot_rotate(coordinator, name: str):
    old, _ = enroll(coordinator)
    revoke(coordinator["engine"], coordinator["registrar"], "hospital-a")
    new = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    refusal = refused(coordinator, rotation(coordinator, new, old, name=name))
    assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not enrolled here" in refusal.details()
    assert len(coordinator["registrar"].registered) == 1


def test_a_new_key_the_superlink_refuses_leaves_the_current_one(coordinator):
    old, node = enroll(coordinator)
    coordinator["registrar"].refuse = True
    new = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    refusal = refused(coordinator, rotation(coordinator, new, old))
    assert refusal.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing changed" in refusal.details()
    assert enrolled_key(coordinator["engine"], "hospital-a") == (openssh_public_key(old), node)
    assert coordinator["registrar"].unregistered == []
    bad = refused(coordinator, rotation(coordinator, b"not a key", old))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- a rotation cut short at the coordinator ------------------------------------------------
@pytest.mark.parametrize("retry_signer", ["current key", "new key"])
@pytest.mark.parametrize("cut", ["unregistering the old node", "recording the new key"])
def test_a_rotation_cut_short_at_the_coordinator_is_finished_by_a_retry(
    coordinator, refuse_updates, cut: str, retry_signer: str
):
    """Cut short after the SuperLink registered the new key: the old node not yet unregistered
    (the SuperLink does not answer once), or unregistered and the final commit failed. The
    answer says what stands; the same request again, signed with either key, finishes it
    without registering the key twice, and the institution can then authenticate with it."""
    old, old_node = enroll(coordinator)
    new = ec.generate_private_key(ec.SECP384R1())
    registrar, engine = coordinator["registrar"], coordinator["engine"]
    if cut == "unregistering the old node":
        registrar.fail_unregister = 1
    else:
        allow = refuse_updates(engine, "institutions")
    first = refused(coordinator, rotation(coordinator, openssh_public_key(new), old))
    assert first.code() == grpc.StatusCode.ABORTED, first.details()
    new_node = 1002
    assert f"node {new_node}" in first.details() and "rotate-key again" in first.details()
    if cut == "unregistering the old node":
        assert "both keys connect" in first.details() and registrar.unregistered == []
    else:
        assert "the old key no longer connects" in first.details()
        assert registrar.unregistered == [old_node]
        allow()
    assert enrolled_key(engine, "hospital-a") == (openssh_public_key(old), old_node)
    signer = old if retry_signer == "current key" else new
    reply = verified_stub(coordinator).RotateKey(
        rotation(coordinator, openssh_public_key(new), signer), timeout=10
    )
    assert reply.node_id == new_node and len(registrar.registered) == 2
    assert registrar.unregistered == [old_node]
    assert enrolled_key(engine, "hospital-a") == (openssh_public_key(new), new_node)
    newer = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    assert verified_stub(coordinator).RotateKey(rotation(coordinator, newer, new), timeout=10)


def test_a_new_key_whose_node_id_could_not_be_recorded_is_refused_and_unregistered(
    coordinator, refuse_updates
):
    """The SuperLink registered the new key and the coordinator could not record its node id:
    the node is unregistered again (no node it does not know of), the answer says so and
    that the key cannot be used again, and the current key stays in use."""
    old, old_node = enroll(coordinator)
    new = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    allow = refuse_updates(coordinator["engine"], "key_rotations")
    refusal = refused(coordinator, rotation(coordinator, new, old))
    assert refusal.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "node 1002 was unregistered again" in refusal.details()
    assert "current key stays in use" in refusal.details()
    assert coordinator["registrar"].unregistered == [1002]
    allow()
    again = refused(coordinator, rotation(coordinator, new, old))  # the same key: spent
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot be used" in again.details() and "delete institution.key.next" in again.details()
    fresh = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    reply = verified_stub(coordinator).RotateKey(rotation(coordinator, fresh, old), timeout=10)
    assert enrolled_key(coordinator["engine"], "hospital-a") == (fresh, reply.node_id)
    assert coordinator["registrar"].unregistered == [1002, old_node]


def test_revoking_during_a_rotation_unregisters_both_keys(coordinator):
    old, old_node = enroll(coordinator)
    new = ec.generate_private_key(ec.SECP384R1())
    coordinator["registrar"].fail_unregister = 1
    refused(coordinator, rotation(coordinator, openssh_public_key(new), old))
    revoke(coordinator["engine"], coordinator["registrar"], "hospital-a")
    assert sorted(coordinator["registrar"].unregistered) == sorted([old_node, 1002])
    after = refused(coordinator, rotation(coordinator, openssh_public_key(new), new))
    assert after.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_rotation_whose_new_node_was_unregistered_meanwhile_is_refused_not_completed(
    coordinator,
):
    """A rotation cut short at step 3, then its new node unregistered (a revocation that
    failed halfway, an operator): a retry must not make that dead node the institution's;
    the current key stays, and a rotation to a fresh key works."""
    old, old_node = enroll(coordinator)
    new = ec.generate_private_key(ec.SECP384R1())
    registrar, engine = coordinator["registrar"], coordinator["engine"]
    registrar.fail_unregister = 1
    first = refused(coordinator, rotation(coordinator, openssh_public_key(new), old))
    assert first.code() == grpc.StatusCode.ABORTED
    registrar.unregister(1002)  # the new key's node, gone before the rotation finished
    retry = refused(coordinator, rotation(coordinator, openssh_public_key(new), old))
    assert "was unregistered before the rotation finished" in retry.details()
    assert enrolled_key(engine, "hospital-a") == (openssh_public_key(old), old_node)
    fresh = openssh_public_key(ec.generate_private_key(ec.SECP384R1()))
    reply = verified_stub(coordinator).RotateKey(rotation(coordinator, fresh, old), timeout=10)
    assert enrolled_key(engine, "hospital-a") == (fresh, reply.node_id)
    assert registrar.unregistered == [1002, old_node]
