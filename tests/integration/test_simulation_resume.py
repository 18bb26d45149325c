"""`confide-simulate run --resume`: a run killed (SIGKILL, its whole process group) after its
first checkpoint is finished from that checkpoint with the model, rounds and central epsilon
of the same run left alone; the virtual institutions' ledgers keep every round they recorded,
the one lost in flight included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, cli, environment, wait_until

from confide.privacy.config import CentralPrivacyConfig
from confide.privacy.ledger import Ledger
from confide.server.central_dp import central_epsilon
from confide.server.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

SCENARIO = """
name = "resumable"
seed = 3
[simulation]
institutions = 3
[task]
name = "digits"
[data]
test_fraction = 0.2
validation_fraction = 0.1
[train]
local_epochs = 4  # rounds long enough that the kill lands inside round 2 or 3
batch_size = 32
lr = 0.5
[privacy]
noise_multiplier = 1.0
[central_privacy]
enabled = true
noise_multiplier = 0.5
clipping_norm = 5.0
[federation]
rounds = 3
min_available = 3
min_train = 3
min_evaluate = 0
fraction_evaluate = 0.0
"""
CENTRAL = CentralPrivacyConfig(enabled=True, noise_multiplier=0.5, clipping_norm=5.0)


def simulate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = cli("confide-simulate", "run", *args, "--quiet", timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def in_session(session: int) -> list[int]:
    """Processes still in session `session` (the killed run's, and whatever it started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def killed_after_its_first_checkpoint(scenario: Path, out: Path) -> Path:
    """Start the run, SIGKILL its process group as soon as round 1 is checkpointed; its folder."""
    process = subprocess.Popen(
        [str(BIN / "confide-simulate"), "run", str(scenario), "--quiet", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
        cwd=scenario.parent,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: any(out.glob("*/checkpoint.ckpt")),
            seconds=300,
            what="the run's first checkpoint",
            pause=0.01,
            process=process,
        )
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        # Whatever it started and is not gone with it (Ray's processes end with their parent).
        deadline = time.monotonic() + 30
        while (left := in_session(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    (folder,) = out.iterdir()
    return folder


def spends(ledgers: Path, index: int) -> list[tuple[str, int]]:
    entries = Ledger(ledgers / f"institution-{index}").entries()
    return [(entry.run, entry.round) for entry in entries if entry.kind == "spend"]


def test_a_killed_run_resumed_ends_with_the_uninterrupted_runs_model(tmp_path: Path):
    scenario = tmp_path / "resumable.toml"
    scenario.write_text(SCENARIO)
    simulate(str(scenario), "--out", str(tmp_path / "whole"), cwd=tmp_path)
    (whole,) = (tmp_path / "whole").iterdir()
    expected = json.loads((whole / "results.json").read_text())
    assert not (whole / "checkpoint.ckpt").exists()  # a finished run keeps none

    started = time.monotonic()
    folder = killed_after_its_first_checkpoint(scenario, tmp_path / "cut")
    assert not (folder / "results.json").exists()
    checkpoint = CheckpointStore.in_folder(folder).load(folder.name)
    assert checkpoint.round in (1, 2), "the kill landed after the run's last round"
    done = simulate("--resume", str(folder), cwd=tmp_path)
    resumed_seconds = time.monotonic() - started
    assert f"resuming {folder} after round {checkpoint.round}" in " ".join(done.stdout.split())

    results = json.loads((folder / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert results["resumed"] == [
        {"from_round": checkpoint.round + 1, "run": results["resumed"][0]["run"]}
    ]
    assert results["model"]["sha256"] == expected["model"]["sha256"]
    assert [r["accuracy"] for r in results["rounds"]] == [r["accuracy"] for r in expected["rounds"]]
    final_central = results["privacy"]["institution_level"]["epsilon"]
    assert final_central == pytest.approx(central_epsilon(CENTRAL, [3, 3, 3]))
    assert final_central == expected["privacy"]["institution_level"]["epsilon"]
    assert not (folder / "checkpoint.ckpt").exists() and not (folder / "checkpoint.key").exists()

    # Every ledger entry of the job is under the run's identity (its folder's name), every
    # round is there, and a round recorded but lost in the kill stays spent: the results
    # show it (rounds_recorded) and each epsilon is at least the uninterrupted one's.
    rows = {row["id"]: row for row in results["institutions"]}
    for index in range(3):
        recorded = spends(folder / "state", index)
        assert {run for run, _ in recorded} == {folder.name}
        assert sorted({r for _, r in recorded}) == [1, 2, 3]
        assert len(recorded) in (3, 4)
        row = rows[index]
        assert row["rounds_trained"] == 3 and row["rounds_recorded"] == len(recorded)
        assert row["epsilon"] >= expected["institutions"][index]["epsilon"]
        assert spends(whole / "state", index) == [(whole.name, r) for r in (1, 2, 3)]
    print(  # the closing note's comparison
        f"\nuninterrupted: {expected['timing']['total_seconds']:.1f}s run, accuracy "
        f"{expected['final']['accuracy']:.4f}; killed after round {checkpoint.round} and "
        f"resumed: {results['timing']['total_seconds']:.1f}s run ({resumed_seconds:.1f}s wall "
        f"with the restart), accuracy {results['final']['accuracy']:.4f}, model "
        f"{results['model']['sha256'][:12]} (same), ledger rounds "
        f"{[len(spends(folder / 'state', i)) for i in range(3)]}"
    )
