"""`confide-server init` and `token create` as an operator runs them."""

from __future__ import annotations

import stat
import subprocess

from helpers import cli

from confide.server import pki
from confide.server.settings import StateDir
from confide.server.state import open_database
from confide.server.tokens import JoinToken, redeem_token


def server(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("confide-server", *args)


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


def test_submit_refuses_a_bad_job_before_contacting_the_superlink(tmp_path):
    state = tmp_path / "state"
    assert server("init", "--dir", str(state)).returncode == 0
    job = tmp_path / "job.toml"
    job.write_text("[privacy]\ndelta = 2.0\n")
    refused = server("submit", str(job), "--dir", str(state))
    assert refused.returncode == 2
    assert "job.toml: invalid job" in refused.stderr and "privacy.delta" in refused.stderr
    assert not StateDir(state).jobs.exists() or not any(StateDir(state).jobs.iterdir())


def test_jobs_commands_need_a_coordinator_state_directory(tmp_path):
    for args in (["submit", "job.toml"], ["status"], ["logs", "1"]):
        refused = server(*args, "--dir", str(tmp_path / "nowhere"))
        assert refused.returncode == 2 and "confide-server init" in refused.stderr, args


def test_status_says_when_the_superlink_is_not_running(tmp_path):
    state = tmp_path / "state"
    assert server("init", "--dir", str(state), "--superlink-port", "1").returncode == 0
    (state / "flwr").mkdir()
    (state / "flwr" / "config.toml").write_text(
        '[superlink]\ndefault = "confide"\n[superlink.confide]\naddress = "127.0.0.1:1"\n'
        f'root-certificates = "{state / "ca.pem"}"\n'
    )
    refused = server("status", "--dir", str(state))
    assert refused.returncode == 2 and "cannot list runs" in refused.stderr
