"""A coordinator killed mid-job (SIGKILL: the coordinator, its SuperLink and the job's
ServerApp, as a power cut would) and started again on its state folder: `confide-server
resume` continues the job after its last checkpointed round, the institutions reconnect by
themselves, the results list every round once, each institution's ledger holds exactly the
rounds it trained (a round trained when the coordinator died stays spent, and is shown as
such) and central DP's epsilon goes on from the first run's releases."""

from __future__ import annotations

import json
import os
import signal
import time
import tomllib
from contextlib import suppress
from pathlib import Path

import pytest
from helpers import (
    Started,
    cli,
    confide,
    free_port,
    init_coordinator,
    new_token,
    spawned_by,
    wait_until,
)

from confide.privacy.config import CentralPrivacyConfig
from confide.privacy.ledger import Ledger
from confide.server.central_dp import central_epsilon
from confide.server.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

JOB = """
name = "resumed-job"
seed = 0
[task]
name = "digits"
[train]
batch_size = 64
lr = 1.0
[privacy]
noise_multiplier = 1.0
[central_privacy]
enabled = true
noise_multiplier = 0.02
clipping_norm = 2.0
[federation]
rounds = 3
min_available = 2
min_train = 2
min_evaluate = 0
fraction_evaluate = 0.0
timeout = 120
"""
CENTRAL = CentralPrivacyConfig(enabled=True, noise_multiplier=0.02, clipping_norm=2.0)


def digits_files(folder: Path) -> list[Path]:
    """Two institutions' CSV files of digits examples the coordinator's test set excludes."""
    from confide.tasks.config import DataConfig, TaskConfig
    from confide.tasks.splits import federate

    split = federate(
        TaskConfig(name="digits"), DataConfig(validation_fraction=0.0), institutions=2, seed=0
    )
    paths = []
    for index, local in enumerate(split.institutions):
        lines = [",".join([*(f"p{j}" for j in range(64)), "digit"])]
        lines += [
            ",".join([*(f"{value:.4f}" for value in row), str(label)])
            for row, label in zip(local.train.x, local.train.y, strict=True)
        ]
        paths.append(folder / f"hospital-{index}.csv")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


def join(state: Path, enrollment: int, data: Path, folder: Path, name: str) -> None:
    joined = cli(
        "confide-client", "join", "--server", f"127.0.0.1:{enrollment}",
        "--token", new_token(state, name), "--dir", str(folder), "--data", str(data),
        "--port", str(free_port()), "--label-column", "digit", "--no-start",
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(spawned_by(current))
    return found


def crash(coordinator: Started) -> None:
    """SIGKILL the coordinator and everything below it (its SuperLink runs in a session of
    its own, and the job's ServerApp below that): nothing gets to clean up."""
    for pid in descendants(coordinator.process.pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    coordinator.finish(signal.SIGKILL)


def spends(folder: Path, run: str) -> list[int]:
    return [e.round for e in Ledger(folder).entries() if e.kind == "spend" and e.run == run]


def test_a_killed_coordinator_resumes_the_job_where_its_checkpoint_left_it(tmp_path: Path):
    state = tmp_path / "coordinator"
    ports = init_coordinator(state)
    coordinator = confide("confide-server start", "--dir", str(state))
    institutions: list[Started] = []
    folders = [tmp_path / "train-0", tmp_path / "train-1"]
    try:
        coordinator.wait_for("ready", 120)
        for index, data in enumerate(digits_files(tmp_path)):
            join(state, ports["enrollment"], data, folders[index], f"train-{index}")
            institutions.append(confide("confide-client start", "--dir", str(folders[index])))
        for index, started in enumerate(institutions):
            started.wait_for(f"taking train-{index}'s tasks", 120)
        (tmp_path / "job.toml").write_text(JOB)
        submitted = cli(
            "confide-server", "submit", str(tmp_path / "job.toml"), "--dir", str(state),
            "--no-follow", "--wait", "60",
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run = submitted.stdout.split("as run ")[1].split(";")[0].strip()
        store = CheckpointStore.for_run(state, run)
        uninterrupted_start = time.monotonic()
        # Round 1 is checkpointed, round 2 starts at once: kill everything then.
        # (Round 1's release is charged in a checkpoint of the job's start, round 0, first.)
        wait_until(
            lambda: store.exists() and store.load(run).round >= 1,
            seconds=240,
            what="round 1's checkpoint",
            pause=0.05,
        )
        crash(coordinator)
        killed_after = time.monotonic() - uninterrupted_start
        cut = store.load(run)
        assert cut.round == 1
        # Round 2's release, if it was made before the kill, is charged and counts again.
        releases = [2, 2, 2, *cut.unrecorded_releases]
        assert not (state / "runs" / f"run-{run}" / "results.json").exists()

        restarted = time.monotonic()
        coordinator = confide("confide-server start", "--dir", str(state))
        coordinator.wait_for("ready", 120)
        # The killed run stays `running` until its heartbeat lapses: resume waits for it.
        resumed = cli(
            "confide-server", "resume", run, "--dir", str(state), "--wait", "180",
            timeout=600,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr + coordinator.output
        new_run = resumed.stdout.split("as run ")[1].split(";")[0].strip()
        assert f"after round 1 of 3 as run {new_run}" in " ".join(resumed.stdout.split())
        folder = state / "runs" / f"run-{run}"
        resumed_seconds = time.monotonic() - restarted

        def finished() -> bool:  # the run's last steps after its results: audit, cleanup
            audit = cli("confide-server", "audit", "--dir", str(state), "--json")
            return '"run.finished"' in audit.stdout and not store.exists()

        wait_until(finished, seconds=60, what="the resumed run's end", pause=1.0)
        results = json.loads((folder / "results.json").read_text())
        assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
        assert results["resumed"] == [{"from_round": 2, "run": new_run}]
        assert all(r["institutions_trained"] == 2 for r in results["rounds"])
        # Central epsilon went on from round 1's release: three releases of two institutions.
        assert results["rounds"][-1]["central_epsilon"] == pytest.approx(
            central_epsilon(CENTRAL, releases)
        )
        report = json.loads((folder / "privacy.json").read_text())
        assert report["institution_level"]["institutions_asked_per_round"] == releases
        assert not store.exists()  # the job finished: nothing left to resume
        rows = {row["id"]: row for row in results["institutions"]}
        for index, institution in enumerate(folders):
            # Every entry under the job's first run; round 2 twice if the institution had
            # recorded it when the coordinator died (spent, conservatively), and the
            # results say so.
            rounds = spends(institution, run)
            assert rounds in ([1, 2, 3], [1, 2, 2, 3]), rounds
            assert spends(institution, new_run) == []
            row = rows[f"train-{index}"]
            assert row["rounds_trained"] == 3 and row["rounds_recorded"] == len(rounds)
            settings = tomllib.loads((institution / "institution.toml").read_text())
            assert settings["node_id"]  # the same enrolment: it reconnected by itself
        status = cli("confide-server", "status", "--dir", str(state), "--run", new_run)
        assert str(folder) in "".join(status.stdout.split()), status.stdout
        audit = cli("confide-server", "audit", "--dir", str(state), "--json")
        actions = [json.loads(line)["action"] for line in audit.stdout.splitlines()]
        assert "run.resumed" in actions and actions.count("run.finished") == 1
        # Refused: a finished run.
        again = cli("confide-server", "resume", run, "--dir", str(state))
        assert again.returncode == 2 and "finished" in again.stderr
        print(  # the closing note's comparison
            f"\nrun {run}: killed {killed_after:.1f}s after submission (round 1 checkpointed); "
            f"restart + resume to results: {resumed_seconds:.1f}s; job total "
            f"{results['timing']['total_seconds']:.1f}s; rounds {results['rounds']}; ledgers "
            f"{[spends(f, run) for f in folders]}"
        )
    finally:
        for started in institutions:
            started.finish()
        coordinator.finish()
