"""The coordinator's CA and server certificate."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from confide.server import pki


@pytest.fixture(scope="module")
def authority():
    return pki.create_ca()


def test_ca_is_a_self_signed_ca_limited_to_end_entities(authority):
    _, ca = authority
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    ca.verify_directly_issued_by(ca)


def test_server_certificate_names_every_host_and_chains_to_the_ca(authority):
    ca_key, ca = authority
    _, server = pki.issue_server_certificate(ca_key, ca, ["coordinator.example", "10.0.0.5"])
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    server.verify_directly_issued_by(ca)


def test_server_certificate_needs_a_host(authority):
    with pytest.raises(pki.PKIError, match="at least one host"):
        pki.issue_server_certificate(*authority, [])


def test_fingerprint_is_sha256_of_der_and_differs_between_cas(authority):
    _, ca = authority
    _, other = pki.create_ca()
    assert len(pki.fingerprint(ca)) == 64
    assert pki.fingerprint(ca) != pki.fingerprint(other)
    assert pki.fingerprint(ca) == pki.fingerprint(ca)


def test_private_keys_are_written_owner_only_and_round_trip(tmp_path, authority):
    key, ca = authority
    pki.write_private_key(tmp_path / "ca.key", key)
    pki.write_certificate(tmp_path / "ca.pem", ca)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.pem").stat().st_mode) == 0o644
    assert pki.load_certificate(tmp_path / "ca.pem") == ca
    loaded = pki.load_private_key(tmp_path / "ca.key")
    assert loaded.public_key().public_numbers() == key.public_key().public_numbers()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_certificate_and_key_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(pki.PKIError, match=r"garbage\.pem"):
        pki.load_certificate(garbage)
    with pytest.raises(pki.PKIError, match=r"garbage\.pem"):
        pki.load_private_key(garbage)
    with pytest.raises(pki.PKIError, match="no such"):
        pki.load_certificate(tmp_path / "missing.pem")
