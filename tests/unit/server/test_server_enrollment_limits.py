"""The enrollment service's rate limit on failed token redemptions, and its audit entries,
over real TLS on 127.0.0.1 (a stand-in SuperLink registers the keys)."""

from __future__ import annotations

import datetime
import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confide.protos.key_rotation import rotation_message, sign_rotation
from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc
from confide.server import pki
from confide.server.audit import AuditLog
from confide.server.enrollment import EnrollmentService, key_fingerprint, peer_address, serve
from confide.server.institutions import enrolled_key
from confide.server.settings import ServerSettings, StateDir
from confide.server.state import open_database
from confide.server.tokens import RedemptionLimiter, create_token

DAY = datetime.timedelta(days=1)


class Registrar:
    def __init__(self) -> None:
        self.nodes: dict[int, str] = {}

    def register(self, public_key_openssh: bytes, institution: str) -> int:
        node_id = 1000 + len(self.nodes) + 1
        self.nodes[node_id] = "registered"
        return node_id

    def unregister(self, node_id: int) -> None:
        self.nodes[node_id] = "unregistered"

    def statuses(self) -> dict[int, str]:
        return dict(self.nodes)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


@pytest.fixture
def enrollment(tmp_path: Path):
    directory = StateDir(tmp_path / "state")
    directory.root.mkdir()
    settings = ServerSettings()
    directory.save_settings(settings)
    ca_key, ca = pki.create_ca()
    server_key, server = pki.issue_server_certificate(ca_key, ca, ["localhost", "127.0.0.1"])
    pki.write_certificate(directory.ca_certificate, ca)
    pki.write_certificate(directory.server_certificate, server, ca)
    pki.write_private_key(directory.server_key, server_key)
    engine = open_database(directory.database_url(settings))
    audit = AuditLog(directory, engine)
    clock = Clock()
    service = EnrollmentService(
        directory.ca_certificate,
        engine,
        Registrar(),
        "127.0.0.1:9091",
        audit=audit,
        limiter=RedemptionLimiter(clock=clock),
    )
    server, port = serve(
        service,
        "127.0.0.1:0",
        server_key=directory.server_key,
        server_certificate=directory.server_certificate,
    )
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(pki.pem(ca)))
    yield {
        "stub": enrollment_pb2_grpc.EnrollmentStub(channel),
        "engine": engine,
        "audit": audit,
        "clock": clock,
        "fingerprint": pki.fingerprint(ca),
        "service": service,
    }
    channel.close()
    server.stop(0)
    engine.dispose()


def register(enrollment, token: str, key: ec.EllipticCurvePrivateKey | None = None):
    key = key or ec.generate_private_key(ec.SECP384R1())
    request = enrollment_pb2.RegisterRequest(token=token, public_key_openssh=public_key(key))
    return enrollment["stub"].Register(request, timeout=10)


def refusal(enrollment, token: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        register(enrollment, token)
    return refused.value


def test_the_limiter_allows_five_failures_then_one_every_twelve_seconds():
    clock = Clock()
    limiter = RedemptionLimiter(clock=clock)
    assert [limiter.failed("10.0.0.5") for _ in range(5)] == [False] * 4 + [True]
    assert limiter.retry_after("10.0.0.5") == pytest.approx(12.0)
    assert limiter.retry_after("10.0.0.6") == 0  # another address is not affected
    clock.now += 12
    assert limiter.retry_after("10.0.0.5") == 0
    assert limiter.failed("10.0.0.5") is True
    clock.now += 60
    assert limiter.retry_after("10.0.0.5") == 0
    limiter.failed("10.0.0.6")
    assert "10.0.0.5" not in limiter._buckets  # full again: forgotten


def test_failed_redemptions_are_rate_limited_per_address_and_audited(enrollment):
    for bad in ["not-a-token", "cft1.0123456789abcdef.wrong." + "0" * 64] + ["garbage"] * 3:
        assert refusal(enrollment, bad).code() == grpc.StatusCode.UNAUTHENTICATED
    token = create_token(
        enrollment["engine"], "hospital-a", ttl=DAY, ca_fingerprint=enrollment["fingerprint"]
    )
    limited = refusal(enrollment, str(token))  # even a valid token waits
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many refused requests from 127.0.0.1: try again in 12 s" in limited.details()
    enrollment["clock"].now += 12
    reply = register(enrollment, str(token))
    assert reply.institution == "hospital-a"
    entries = enrollment["audit"].entries()
    refused = [entry for entry in entries if entry.action == "token.refused"]
    assert len(refused) == 5
    assert all(entry.details["peer"] == "127.0.0.1" for entry in refused)
    assert "further joins from 127.0.0.1 refused for 12 s" in refused[-1].details["reason"]
    redeemed, registered = entries[-2:]
    assert redeemed.action == "token.redeemed" and redeemed.actor == "institution:hospital-a"
    assert redeemed.details["token_id"] == token.token_id
    assert registered.action == "institution.registered"
    assert registered.details["node_id"] == reply.node_id
    assert str(registered.details["key_fingerprint"]).startswith("SHA256:")
    assert token.secret not in "".join(entry.model_dump_json() for entry in entries)
    assert enrollment["audit"].verify() == []


def test_successful_joins_take_nothing_and_every_refusal_counts(enrollment):
    """A refused join spends nothing (its token is valid again), so every refusal counts,
    whatever the reason: one valid token could otherwise write audit entries without end."""
    key = ec.generate_private_key(ec.SECP384R1())
    for name in ("a", "b", "c", "d", "e", "f"):
        token = create_token(
            enrollment["engine"], name, ttl=DAY, ca_fingerprint=enrollment["fingerprint"]
        )
        register(enrollment, str(token), key if name == "a" else None)
    codes = []
    token = create_token(
        enrollment["engine"], "a", ttl=DAY, ca_fingerprint=enrollment["fingerprint"]
    )
    for _ in range(6):  # already enrolled: a valid token, refused for another reason
        codes.append(refusal(enrollment, str(token)).code())
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    reasons = [e.details["reason"] for e in enrollment["audit"].entries() if "reason" in e.details]
    assert len(reasons) == 5 and all("already enrolled" in reason for reason in reasons)


def test_a_well_formed_token_with_a_bad_key_cannot_flood_the_audit_log(enrollment):
    """The CA fingerprint is public: a made-up token carrying it, with a key that is no key,
    is refused before any token is looked up. Those refusals count too."""
    guess = f"confide1.{'0' * 16}.{'A' * 43}.{enrollment['fingerprint']}"
    request = enrollment_pb2.RegisterRequest(token=guess, public_key_openssh=b"not a key")
    codes = []
    for _ in range(40):
        with pytest.raises(grpc.RpcError) as refused:
            enrollment["stub"].Register(request, timeout=10)
        codes.append(refused.value.code())
    assert codes[:5] == [grpc.StatusCode.INVALID_ARGUMENT] * 5
    assert set(codes[5:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    refused_entries = [e for e in enrollment["audit"].entries() if e.action == "token.refused"]
    assert len(refused_entries) == 5


def test_rotations_refused_before_authentication_count_and_a_limited_address_waits(enrollment):
    token = create_token(
        enrollment["engine"], "hospital-a", ttl=DAY, ca_fingerprint=enrollment["fingerprint"]
    )
    old = ec.generate_private_key(ec.SECP384R1())
    register(enrollment, str(token), old)
    stranger = ec.generate_private_key(ec.SECP384R1())
    codes = []
    for _ in range(6):  # signed with a key hospital-a is not enrolled with
        with pytest.raises(grpc.RpcError) as refused:
            enrollment["stub"].RotateKey(
                rotation(enrollment, public_key(stranger), stranger), timeout=10
            )
        codes.append(refused.value.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    with pytest.raises(grpc.RpcError) as limited:  # even the institution itself waits
        enrollment["stub"].RotateKey(rotation(enrollment, public_key(stranger), old), timeout=10)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    enrollment["clock"].now += 12
    enrollment["stub"].RotateKey(rotation(enrollment, public_key(stranger), old), timeout=10)


def test_a_join_whose_audit_entry_cannot_be_written_still_succeeds(enrollment, caplog):
    """The database refuses the audit log (here: its table is gone): the key was registered,
    so the join is answered OK, and the failure is a warning."""
    with enrollment["engine"].begin() as connection:
        connection.exec_driver_sql("DROP TABLE audit_log")
    token = create_token(
        enrollment["engine"], "hospital-a", ttl=DAY, ca_fingerprint=enrollment["fingerprint"]
    )
    with caplog.at_level(logging.WARNING, logger="confide.server.enrollment"):
        reply = register(enrollment, str(token))
    assert reply.institution == "hospital-a"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("audit log not written" in r.getMessage() for r in warnings)
    assert any("could not be written: the database" in r.getMessage() for r in warnings)


class SlowRegistrar(Registrar):
    """Registers after a pause, so that two joins overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[bytes] = []

    def register(self, public_key_openssh: bytes, institution: str) -> int:
        time.sleep(0.5)
        self.keys.append(public_key_openssh)
        return super().register(public_key_openssh, institution)


def test_two_tokens_for_one_institution_redeemed_at_once_register_one_key(enrollment):
    registrar = SlowRegistrar()
    enrollment["service"].registrar = registrar
    tokens = [
        create_token(
            enrollment["engine"], "hospital-a", ttl=DAY, ca_fingerprint=enrollment["fingerprint"]
        )
        for _ in range(2)
    ]
    outcomes: list[object] = []

    def join(token) -> None:  # type: ignore[no-untyped-def]
        try:
            outcomes.append(register(enrollment, str(token)).node_id)
        except grpc.RpcError as error:
            outcomes.append(error.code())

    threads = [threading.Thread(target=join, args=(token,)) for token in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(registrar.keys) == 1
    assert sorted(outcomes, key=str) == sorted([1001, grpc.StatusCode.FAILED_PRECONDITION], key=str)
    assert enrolled_key(enrollment["engine"], "hospital-a") == (registrar.keys[0], 1001)


def rotation(enrollment, new: bytes, signer: ec.EllipticCurvePrivateKey):
    now = int(time.time())
    message = rotation_message(
        institution="hospital-a",
        new_public_key=new,
        ca_fingerprint=enrollment["fingerprint"],
        timestamp=now,
    )
    return enrollment_pb2.RotateKeyRequest(
        institution="hospital-a",
        new_public_key_openssh=new,
        timestamp=now,
        signature=sign_rotation(signer, message),
    )


def test_a_key_rotation_is_audited_once(enrollment):
    old = ec.generate_private_key(ec.SECP384R1())
    token = create_token(
        enrollment["engine"], "hospital-a", ttl=DAY, ca_fingerprint=enrollment["fingerprint"]
    )
    register(enrollment, str(token), old)
    new_key = ec.generate_private_key(ec.SECP384R1())
    new = public_key(new_key)
    reply = enrollment["stub"].RotateKey(rotation(enrollment, new, old), timeout=10)
    # A retry whose reply was lost, signed with the new key: nothing changes, no entry.
    enrollment["stub"].RotateKey(rotation(enrollment, new, new_key), timeout=10)
    rotated = [e for e in enrollment["audit"].entries() if e.action == "institution.key-rotated"]
    assert len(rotated) == 1
    assert rotated[0].details["node_id"] == reply.node_id
    assert rotated[0].details["key_fingerprint"] == key_fingerprint(new)


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.5:51234", "10.0.0.5"),
        ("ipv6:[::1]:51234", "::1"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_the_peer_address_leaves_out_the_port(peer: str, address: str):
    assert peer_address(peer) == address
