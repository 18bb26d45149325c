"""`confide-server dashboard`: refuses a folder that is no state directory, and otherwise
prints its URL, serves the coordinator's state there and stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import httpx
import pytest
from helpers import cli, confide, free_port

from confide.server.settings import ServerSettings, StateDir
from confide.server.state import open_database


def test_a_folder_that_is_no_state_directory_is_refused(tmp_path: Path):
    done = cli("confide-server", "dashboard", "--dir", str(tmp_path / "nowhere"))
    assert done.returncode == 2, done.stderr
    assert f"{tmp_path / 'nowhere'}: not a coordinator state directory" in done.stderr


def test_a_port_in_use_is_refused_in_one_line(tmp_path: Path):
    state = _state(tmp_path)
    port = free_port()
    first = confide("confide-server dashboard", "--dir", str(state), "--port", str(port))
    try:
        first.wait_for(f"http://127.0.0.1:{port}/", seconds=90)
        done = cli("confide-server", "dashboard", "--dir", str(state), "--port", str(port))
        assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
        assert "Traceback" not in done.stderr
        # The first one serves the state, read-only, and stops cleanly on Ctrl-C.
        response = httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=30)
        assert response.status_code == 200 and response.json()["state"] == str(state)
    finally:
        code = first.finish(signal.SIGINT, grace=30)
    assert code == 0 and "dashboard stopped" in first.output, first.output
    assert re.search(
        rf"dashboard of {re.escape(str(state))}: http://127\.0\.0\.1:{port}/", first.output
    )


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_it_serves_on_the_ipv6_loopback(tmp_path: Path):
    """`--address ::1`: a browser names the host "[::1]:PORT", which is served (a host check
    that took the text before the first colon would refuse it)."""
    state = _state(tmp_path)
    started = confide(
        "confide-server dashboard", "--dir", str(state), "--address", "::1", "--port", "0"
    )
    try:
        started.wait_for("http://[::1]:", seconds=90)
        match = re.search(r"http://\[::1\]:(\d+)/", started.output)
        assert match, started.output
        url = f"http://[::1]:{match.group(1)}"
        response = httpx.get(f"{url}/api/state", timeout=30)
        assert response.status_code == 200 and response.json()["state"] == str(state)
        page = httpx.get(f"{url}/", timeout=30)
        assert page.status_code == 200 and "confide coordinator" in page.text
        refused = httpx.get(f"{url}/", headers={"host": "evil.example"}, timeout=30)
        assert refused.status_code == 400
    finally:
        code = started.finish(signal.SIGINT, grace=30)
    assert code == 0, started.output


def _state(tmp_path: Path) -> Path:
    """A coordinator state folder with its settings and an empty database."""
    state = StateDir(tmp_path / "state")
    state.root.mkdir()
    state.save_settings(ServerSettings())
    open_database(state.database_url(state.load_settings())).dispose()
    return state.root
