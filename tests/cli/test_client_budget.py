"""`confide-client budget`: what an operator reads, and what they do when the ledger fails."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from helpers import cli

from confide.client.institution import InstitutionConfig, InstitutionDir
from confide.privacy.ledger import Ledger, Spend
from confide.privacy.policy import PrivacyPolicy


def client(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("confide-client", *args)


@pytest.fixture
def institution(tmp_path: Path) -> Path:
    """An institution (limit epsilon 10 at delta 1e-6) whose data trained 3 rounds in 2 jobs."""
    data = tmp_path / "data.csv"
    data.write_text("a,label\n1,0\n")
    InstitutionDir(tmp_path).save(
        InstitutionConfig(
            name="hospital-a", node_id=1, superlink="h:1", enrollment="h:2", data=data,
            privacy=PrivacyPolicy(max_epsilon=10.0, max_delta=1e-6),
        )
    )  # fmt: skip
    ledger = Ledger(tmp_path).open()
    for run, server_round in (("1", 1), ("1", 2), ("2", 1)):
        ledger.record(
            Spend("default", "sha256:x", "job", run, server_round, 300, 0.2, 1.1, 5, 1e-5, "rdp")
        )
    return tmp_path


def test_budget_shows_spent_limit_and_remaining_at_the_institutions_delta(institution):
    (expected,) = Ledger(institution).spent(1e-6)
    shown = client("budget", "--dir", str(institution))
    assert shown.returncode == 0, shown.stderr
    assert f"{expected.epsilon:.3f}" in shown.stdout and "1e-06" in shown.stdout
    assert f"{10.0 - expected.epsilon:.3f}" in shown.stdout and "RDP" in shown.stdout
    (line,) = json.loads(client("budget", "--dir", str(institution), "--json").stdout)
    assert line["epsilon"] == pytest.approx(expected.epsilon) and line["jobs"] == 2
    assert line["rounds"] == 3 and line["max_epsilon"] == 10.0 and line["unit"] == "sample"


def test_verify_passes_an_intact_ledger(institution):
    result = client("budget", "verify", "--dir", str(institution))
    assert result.returncode == 0 and "ledger intact: 3 entries" in result.stdout


def test_a_tampered_ledger_is_refused_until_the_operator_reseals_it(institution):
    with sqlite3.connect(institution / "ledger.sqlite") as connection:
        connection.execute("DELETE FROM entries WHERE seq = 2")
    shown = client("budget", "--dir", str(institution))
    assert shown.returncode == 2 and "confide-client budget verify" in shown.stderr
    failed = client("budget", "verify", "--dir", str(institution))
    assert failed.returncode == 1 and "entry 2 is missing" in failed.stderr
    assert "--reseal --reason" in failed.stderr
    no_reason = client("budget", "verify", "--dir", str(institution), "--reseal")
    assert no_reason.returncode == 2 and "reason" in no_reason.stderr
    resealed = client(
        "budget", "verify", "--dir", str(institution), "--reseal", "--reason", "row 2 lost"
    )
    assert resealed.returncode == 0 and "entry 2 is missing" in resealed.stdout
    assert client("budget", "verify", "--dir", str(institution)).returncode == 0
    (line,) = json.loads(client("budget", "--dir", str(institution), "--json").stdout)
    assert line["rounds"] == 2  # what the rows say now


def test_budget_of_a_directory_without_a_ledger_says_so(tmp_path):
    result = client("budget", "--dir", str(tmp_path))
    assert result.returncode == 2 and "no ledger here" in result.stderr
