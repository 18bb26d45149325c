from __future__ import annotations

import datetime
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import cli

Run = Callable[..., subprocess.CompletedProcess[str]]


def _runner(script: str, cwd: Path) -> Run:
    """Run an installed console script in `cwd`, as an operator would (wide, plain output)."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return cli(script, *args, timeout=timeout, cwd=cwd)

    return run


@pytest.fixture
def simulate(tmp_path: Path) -> Run:
    """Run the installed `confide-simulate` console script in `tmp_path`."""
    return _runner("confide-simulate", tmp_path)


@pytest.fixture
def confide_client(tmp_path: Path) -> Run:
    """Run the installed `confide-client` console script in `tmp_path`."""
    return _runner("confide-client", tmp_path)


@pytest.fixture
def records(tmp_path: Path) -> Path:
    """An institution's data file: 40 rows, two features and a binary label."""
    path = tmp_path / "records.csv"
    rows = ["age,dose,label", *(f"{30 + i},{i % 5},{i % 2}" for i in range(40))]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def join_cli(enrollment_coordinator, confide_client: Run, records: Path, tmp_path: Path):
    """`confide-client join --no-start` of institution NAME into `tmp_path/NAME` at the
    enrollment service of `enrollment_coordinator`, with a fresh join token."""
    from confide.server.tokens import create_token

    def join(name: str, *extra: str, data: Path = records) -> subprocess.CompletedProcess[str]:
        token = create_token(
            enrollment_coordinator["engine"],
            name,
            ttl=datetime.timedelta(hours=1),
            ca_fingerprint=enrollment_coordinator["fingerprint"],
        )
        token_file = tmp_path / f"{name}.token"
        token_file.write_text(str(token))
        return confide_client(
            "join",
            "--server",
            f"127.0.0.1:{enrollment_coordinator['port']}",
            "--dir",
            str(tmp_path / name),
            "--data",
            str(data),
            "--token-file",
            str(token_file),
            "--no-start",
            *extra,
        )

    return join


@pytest.fixture
def spent_institution(join_cli, records: Path, tmp_path: Path) -> Path:
    """Institution hospital-a, joined for real, whose ledger recorded 3 DP-SGD rounds on
    `records` (as its ClientApp records them)."""
    from confide.privacy.ledger import Ledger, Spend, fingerprint_file

    joined = join_cli("hospital-a")
    assert joined.returncode == 0, joined.stderr
    folder = tmp_path / "hospital-a"
    fingerprint = fingerprint_file(records)
    ledger = Ledger(folder).open()
    for server_round in (1, 2, 3):
        ledger.record(
            Spend("default", fingerprint, "job", "7", server_round, 32, 0.25, 1.1, 4, 1e-5, "rdp")
        )
    return folder
