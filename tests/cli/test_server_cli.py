"""`confide-server init` and `token create` as an operator runs them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from confide.server import pki
from confide.server.settings import StateDir
from confide.server.state import open_database
from confide.server.tokens import JoinToken, redeem_token

SCRIPT = Path(sys.executable).with_name("confide-server")


def server(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_init_creates_ca_certificate_database_and_settings_with_safe_modes(tmp_path):
    state = tmp_path / "state"
    result = server("init", "--dir", str(state), "--host", "coordinator.example")
    assert result.returncode == 0, result.stderr
    directory = StateDir(state)
    ca = pki.load_certificate(directory.ca_certificate)
    assert pki.fingerprint(ca) in result.stdout
    chain = directory.server_certificate.read_bytes().count(b"BEGIN CERTIFICATE")
    assert chain == 2  # leaf, then the CA: clients can verify the full chain
    pki.load_certificate(directory.server_certificate).verify_directly_issued_by(ca)
    # the coordinator reaches its own SuperLink locally, so those names are always included
    assert directory.load_settings().hosts == ["coordinator.example", "localhost", "127.0.0.1"]
    for secret in (directory.ca_key, directory.server_key, state / "confide.db"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert directory.ca_key.read_text() not in result.stdout + result.stderr


def test_init_refuses_an_existing_state_directory_without_force(tmp_path):
    state = tmp_path / "state"
    assert server("init", "--dir", str(state)).returncode == 0
    first = pki.fingerprint(pki.load_certificate(StateDir(state).ca_certificate))
    refused = server("init", "--dir", str(state))
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert pki.fingerprint(pki.load_certificate(StateDir(state).ca_certificate)) == first
    assert server("init", "--dir", str(state), "--force").returncode == 0
    assert pki.fingerprint(pki.load_certificate(StateDir(state).ca_certificate)) != first


def test_token_create_prints_a_redeemable_token_bound_to_the_ca(tmp_path):
    state = tmp_path / "state"
    assert server("init", "--dir", str(state)).returncode == 0
    result = server(
        "token", "create", "--dir", str(state), "--institution", "hospital-a", "--ttl", "2h"
    )
    assert result.returncode == 0, result.stderr
    token = JoinToken.parse(result.stdout)
    directory = StateDir(state)
    assert token.ca_fingerprint == pki.fingerprint(pki.load_certificate(directory.ca_certificate))
    engine = open_database(directory.database_url(directory.load_settings()))
    assert redeem_token(engine, token) == "hospital-a"
    engine.dispose()


def test_token_create_refusals_are_clear(tmp_path):
    missing = server("token", "create", "--dir", str(tmp_path / "nowhere"), "--institution", "a")
    assert missing.returncode == 2 and "confide-server init" in missing.stderr
    state = tmp_path / "state"
    assert server("init", "--dir", str(state)).returncode == 0
    bad_name = server("token", "create", "--dir", str(state), "--institution", "Bad Name")
    assert bad_name.returncode == 2 and "institution name" in bad_name.stderr
    bad_ttl = server("token", "create", "--dir", str(state), "--institution", "a", "--ttl", "1w")
    assert bad_ttl.returncode == 2 and "--ttl" in bad_ttl.stderr
