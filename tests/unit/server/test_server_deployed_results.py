"""Every way of running a job writes its results: under the coordinator in its runs folder,
and without it (`flwr run .` on a bare SuperLink) in a folder the run config may choose."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import pytest
from flwr.app import Context, Message, RecordDict

from confide.server.app import (
    JOB_KEY,
    RESULTS_KEY,
    Deployment,
    JobFailed,
    _deployed_run,
    job_from_run_config,
)
from confide.server.flower import RESULTS_ENV, STATE_ENV

# A one-round job as `flwr run .` passes it: the pyproject's flat keys, plus where to write.
RUN_CONFIG: dict[str, bool | float | int | str] = {
    "seed": 0,
    "task.name": "digits",
    "data.test_fraction": 0.2,
    "data.validation_fraction": 0.1,
    "train.batch_size": 64,
    "privacy.noise_multiplier": 1.0,
    "federation.rounds": 1,
    "federation.min_available": 3,
    "federation.min_train": 2,
    "federation.min_evaluate": 0,
    "federation.fraction_evaluate": 0.0,
}


@pytest.fixture(autouse=True)
def no_coordinator_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(RESULTS_ENV, raising=False)
    monkeypatch.delenv(STATE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the SuperLink's working directory


class PushPull:
    """Flower's push/pull over an in-process grid (what PromptGrid, the deployed ServerApp's
    grid, calls): each pushed message is answered at once by the node's ClientApp."""

    def __init__(self, grid) -> None:  # type: ignore[no-untyped-def]
        self.grid = grid
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            (reply,) = self.grid.send_and_receive([message])
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def context(run_config: dict[str, bool | float | int | str], run_id: int = 7) -> Context:
    return Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )


def test_without_a_coordinator_results_go_to_results_flwr_run_id_in_the_working_directory(
    tmp_path: Path,
):
    deployment = Deployment(None)
    assert deployment.results_directory(7, {}) == tmp_path / "results" / "flwr-run-7"
    chosen = deployment.results_directory(7, {RESULTS_KEY: "elsewhere/out"})
    assert chosen == tmp_path / "elsewhere" / "out" / "flwr-run-7"


def test_under_the_coordinator_its_folder_wins_over_the_run_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from confide.server.settings import ServerSettings, StateDir

    state = StateDir(tmp_path / "state")
    state.root.mkdir()
    state.save_settings(ServerSettings())
    deployment = Deployment(state.root)
    try:
        assert deployment.results_directory(7, {RESULTS_KEY: "/tmp/x"}) == state.runs / "run-7"
        monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "named"))
        assert deployment.results_directory(7, {}) == tmp_path / "named" / "run-7"
    finally:
        deployment.close()


def test_the_results_folder_key_is_not_part_of_the_job():
    name, job = job_from_run_config(RUN_CONFIG | {RESULTS_KEY: "out"})
    assert name == "job" and job.federation.rounds == 1


@pytest.mark.usefixtures("inside_a_run")
def test_a_run_on_a_bare_superlink_writes_the_same_files_as_any_run(federation, tmp_path: Path):
    grid, _ = federation()
    _deployed_run(Deployment(None), PushPull(grid), context(RUN_CONFIG))  # type: ignore[arg-type]
    directory = tmp_path / "results" / "flwr-run-7"
    results = json.loads((directory / "results.json").read_text())
    assert results["scenario"] == "job" and len(results["rounds"]) == 1
    assert results["rounds"][0]["institutions_trained"] == 3
    assert sorted(row["id"] for row in results["institutions"]) == ["0", "1", "2"]
    assert json.loads((directory / "privacy.json").read_text())["sample_level"]
    assert tomllib.loads((directory / "job.toml").read_text())["federation"]["rounds"] == 1
    assert (directory / "metrics.png").is_file() and (directory / "epsilon.png").is_file()


def test_a_submitted_job_without_the_coordinator_is_refused_before_any_results_folder(
    tmp_path: Path,
):
    with pytest.raises(JobFailed, match=STATE_ENV):
        _deployed_run(Deployment(None), None, context({JOB_KEY: "{}", RESULTS_KEY: "out"}))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
