"""`confide-client join`: the size an institution publishes, and its local delta check."""

from __future__ import annotations

import tomllib


def test_join_declares_the_training_examples_rounded_and_says_it_publishes_them(join_cli, tmp_path):
    # records: 40 rows, 10 % held out for validation (ceil(4)): 36 training examples.
    joined = join_cli("hospital-a")
    assert joined.returncode == 0, joined.stderr
    settings = tomllib.loads((tmp_path / "hospital-a" / "institution.toml").read_text())
    assert settings["declared_examples"] == 36
    assert settings["noise_generator"] == "csprng"
    assert "declared size: 36 examples (published" in " ".join(joined.stdout.split())


def test_join_refuses_a_max_delta_not_below_one_over_n_before_registering(
    join_cli, enrollment_coordinator, tmp_path
):
    refused = join_cli("hospital-a", "--max-delta", "0.03")
    assert refused.returncode == 2
    assert "max_delta = 0.03 is not below 1/36" in " ".join(refused.stderr.split())
    assert enrollment_coordinator["registrar"].registered == []
    assert not (tmp_path / "hospital-a").exists()


def test_join_takes_a_declared_size_and_warns_when_it_is_far_from_the_data(join_cli, tmp_path):
    joined = join_cli("hospital-a", "--declared-examples", "1000")
    assert joined.returncode == 0, joined.stderr
    settings = tomllib.loads((tmp_path / "hospital-a" / "institution.toml").read_text())
    assert settings["declared_examples"] == 1000
    assert "declared_examples = 1000, but the data holds 36" in " ".join(joined.stdout.split())


def test_join_saves_the_metrics_port_and_address_for_every_later_start(join_cli, tmp_path):
    from helpers import free_port

    port = free_port()
    joined = join_cli("hospital-b", "--metrics-port", str(port), "--metrics-address", "127.0.0.1")
    assert joined.returncode == 0, joined.stderr
    settings = tomllib.loads((tmp_path / "hospital-b" / "institution.toml").read_text())
    assert (settings["metrics_port"], settings["metrics_address"]) == (port, "127.0.0.1")


def test_join_refuses_a_taken_metrics_port_before_it_enrolls_and_the_token_stays_unused(
    join_cli, enrollment_coordinator, tmp_path
):
    import socket

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from confide.server.state import JoinTokenRow

    with socket.socket() as holder:  # another institution's /metrics on this host
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        refused = join_cli("hospital-b", "--metrics-port", str(port))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    said = " ".join(refused.stderr.split())
    assert f"port {port} for the institution's metrics (127.0.0.1:{port})" in said
    assert "the token is still unused" in said
    assert enrollment_coordinator["registrar"].registered == []
    assert not (tmp_path / "hospital-b").exists()
    with Session(enrollment_coordinator["engine"]) as session:
        used = list(session.scalars(select(JoinTokenRow.used_at)))
    assert used == [None]  # the token join was given is still unused
