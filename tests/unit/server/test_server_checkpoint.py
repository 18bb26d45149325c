"""A job's checkpoint: encrypted at rest, refused when altered or foreign, and a job resumed
from it ends with the model, rounds, spends and central epsilon of an uninterrupted one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from confide.common.errors import CheckpointError
from confide.privacy.config import CentralPrivacyConfig, PrivacyConfig, TrainConfig
from confide.privacy.ledger import Ledger
from confide.server.app import run
from confide.server.central_dp import central_epsilon
from confide.server.checkpoint import Checkpointing, CheckpointStore, job_sha256
from confide.server.history import JobHistory
from confide.server.job import FederationConfig, JobConfig
from confide.tasks.config import DataConfig, TaskConfig

pytestmark = pytest.mark.usefixtures("inside_a_run")

CENTRAL = CentralPrivacyConfig(enabled=True, noise_multiplier=0.5, clipping_norm=5.0)


def job(rounds: int = 3) -> JobConfig:
    return JobConfig(
        task=TaskConfig(name="digits"),
        data=DataConfig(test_fraction=0.2, validation_fraction=0.1),
        train=TrainConfig(batch_size=64, lr=1.0),
        privacy=PrivacyConfig(noise_multiplier=1.0),
        central_privacy=CENTRAL,
        federation=FederationConfig(
            rounds=rounds, min_train=2, min_available=3, min_evaluate=0, fraction_evaluate=0.0
        ),
    )


class CoordinatorDied(Exception):
    """The coordinator process ends here (what a SIGKILL does to the job's run)."""


class DyingGrid:
    """`grid`, except that it delivers the `kind` messages of round `dies_in` (institutions
    train and record them, or receive the released model to evaluate), then dies before any
    reply reaches the coordinator."""

    def __init__(self, grid, dies_in: int, kind: str = "train") -> None:  # type: ignore[no-untyped-def]
        self.grid, self.dies_in, self.kind = grid, dies_in, kind

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()  # type: ignore[no-any-return]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        train = [m for m in messages if m.metadata.message_type == self.kind]
        rounds = {int(m.content.config_records["config"]["server-round"]) for m in train}  # type: ignore[arg-type]
        if self.dies_in in rounds:
            raise CoordinatorDied
        return replies


def run_with(
    job_config: JobConfig, grid, source, checkpointing: Checkpointing, noise_seed: int | None = 11
) -> JobHistory:  # type: ignore[no-untyped-def]
    history = JobHistory()
    run(
        job_config,
        grid,
        history=history,
        test_set=source.split().test,
        name="resumable",
        noise_seed=noise_seed,
        identity=checkpointing.run,
        checkpointing=checkpointing,
    )
    return history


def spends(state: Path, index: int) -> list[tuple[str, int]]:
    entries = Ledger(state / f"institution-{index}").entries()
    return [(e.run, e.round) for e in entries if e.kind == "spend"]


def test_a_resumed_job_ends_as_an_uninterrupted_one_and_its_lost_round_stays_spent(
    federation, tmp_path
):
    # Uninterrupted: 3 rounds, ledgers in `whole`.
    grid, source = federation(state="whole")
    whole = CheckpointStore.in_folder(tmp_path / "whole-run")
    expected = run_with(job(), grid, source, Checkpointing(whole, "1", "1"))
    final = expected.model
    assert final is not None and final.round == 3
    # Interrupted: the coordinator dies in round 2 after the institutions recorded it.
    grid, source = federation(state="cut")
    store = CheckpointStore.in_folder(tmp_path / "cut-run")
    with pytest.raises(CoordinatorDied):
        run_with(job(), DyingGrid(grid, dies_in=2), source, Checkpointing(store, "1", "1"))
    checkpoint = store.load("1")
    assert checkpoint.round == 1 and checkpoint.job_sha256 == job_sha256(job())
    assert [(r.round) for r in checkpoint.history.rounds] == [1]
    assert checkpoint.central_releases == [3]
    # Resumed by a new Flower run (id 2, fresh node state), under the job's run identity "1".
    grid, source = federation(state="cut", run_id=2)
    plan = Checkpointing(store, "1", "2", resume=checkpoint, ledgers=None)
    resumed = run_with(job(), grid, source, plan)
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    assert [(r.from_round, r.run) for r in resumed.resumed] == [(2, "2")]
    assert resumed.central_releases == [3, 3, 3]
    assert resumed.rounds[-1].central_epsilon == pytest.approx(central_epsilon(CENTRAL, [3] * 3))
    assert resumed.initial_metrics == expected.initial_metrics
    # The same model and round metrics as the uninterrupted job: the round lost in flight
    # was trained again from the same seeds.
    assert resumed.model is not None
    for name, array in final.arrays.items():
        assert np.array_equal(array.numpy(), resumed.model.arrays[name].numpy()), name
    assert [r.metrics for r in resumed.rounds] == [r.metrics for r in expected.rounds]
    # Each institution's ledger keeps round 2 twice: both were spent (conservative), and
    # the coordinator shows 3 updates received, 4 rounds recorded.
    for index in range(3):
        assert spends(tmp_path / "cut", index) == [("1", 1), ("1", 2), ("1", 2), ("1", 3)]
        spend = resumed.institutions[str(index)]
        assert (spend.rounds_trained, spend.rounds_recorded) == (3, 4)
        assert spend.epsilon > expected.institutions[str(index)].epsilon
    for index in range(3):
        assert spends(tmp_path / "whole", index) == [("1", 1), ("1", 2), ("1", 3)]
        assert expected.institutions[str(index)].rounds_recorded == 3


def evaluated_job() -> JobConfig:
    federation = FederationConfig(
        rounds=3, min_train=2, min_available=3, min_evaluate=1, fraction_evaluate=1.0
    )
    return job().model_copy(update={"federation": federation})


def test_a_release_made_before_the_coordinator_died_is_counted_when_the_job_resumes(
    federation, tmp_path
):
    """Review finding: the coordinator died while sending round 2's released model to be
    evaluated; the institutions hold that release, and the resumed job releases round 2
    again with fresh noise (deployment: the OS CSPRNG), so both count."""
    evaluated = evaluated_job()
    grid, source = federation()
    store = CheckpointStore.for_run(tmp_path / "coordinator", "1")
    plan = Checkpointing(store, "1", "1")
    with pytest.raises(CoordinatorDied):
        run_with(evaluated, DyingGrid(grid, 2, "evaluate"), source, plan, noise_seed=None)
    checkpoint = store.load("1")
    assert (checkpoint.round, checkpoint.central_releases) == (1, [3])
    assert checkpoint.unrecorded_releases == [3]  # round 2's, charged as it was made
    grid, source = federation(run_id=2)
    resumed_plan = Checkpointing(store, "1", "2", resume=checkpoint)
    resumed = run_with(evaluated, grid, source, resumed_plan, noise_seed=None)
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    assert resumed.central_releases == [3, 3, 3, 3]
    assert resumed.rounds[-1].central_epsilon == pytest.approx(central_epsilon(CENTRAL, [3] * 4))


def test_the_first_release_of_a_job_is_charged_in_a_checkpoint_of_its_start(federation, tmp_path):
    grid, source = federation()
    store = CheckpointStore.for_run(tmp_path / "coordinator", "1")
    with pytest.raises(CoordinatorDied):
        run_with(
            evaluated_job(),
            DyingGrid(grid, 1, "evaluate"),
            source,
            Checkpointing(store, "1", "1"),
            None,
        )
    checkpoint = store.load("1")
    assert (checkpoint.round, checkpoint.unrecorded_releases) == (0, [3])
    assert checkpoint.history.rounds == []
    grid, source = federation(run_id=2)
    resumed = run_with(
        evaluated_job(), grid, source, Checkpointing(store, "1", "2", resume=checkpoint), None
    )
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    assert resumed.central_releases == [3, 3, 3, 3]


@pytest.fixture
def saved(federation, tmp_path) -> CheckpointStore:  # type: ignore[no-untyped-def]
    """A one-round job's checkpoint."""
    grid, source = federation()
    store = CheckpointStore.for_run(tmp_path / "coordinator", "7")
    run_with(job(rounds=1), grid, source, Checkpointing(store, "7", "7"))
    return store


def test_the_checkpoint_is_encrypted_and_its_key_is_private(saved: CheckpointStore):
    assert saved.path.name == "run-7.ckpt" and saved.key.name == "checkpoint.key"
    assert saved.key.stat().st_mode & 0o777 == 0o600
    assert saved.path.stat().st_mode & 0o777 == 0o600
    data = saved.path.read_bytes()
    assert b"resumable" not in data and b"digits" not in data  # nothing readable
    assert saved.load("7").round == 1


def test_an_altered_truncated_foreign_or_keyless_checkpoint_is_refused(saved, tmp_path):
    original = saved.path.read_bytes()
    altered = bytearray(original)
    altered[-40] ^= 1
    saved.path.write_bytes(bytes(altered))
    with pytest.raises(CheckpointError, match="altered or truncated"):
        saved.load("7")
    saved.path.write_bytes(original[:60])
    with pytest.raises(CheckpointError, match="altered or truncated"):
        saved.load("7")
    saved.path.write_bytes(original[:10])
    with pytest.raises(CheckpointError, match="not a confide checkpoint"):
        saved.load("7")
    saved.path.write_bytes(original)
    # Copied onto another run's name: the associated data binds it to run 7.
    with pytest.raises(CheckpointError, match="another run's"):
        saved.load("8")
    # Another coordinator's key.
    other = CheckpointStore(saved.path, tmp_path / "other.key")
    other._key(create=True)
    with pytest.raises(CheckpointError, match="another key"):
        other.load("7")
    saved.key.unlink()
    with pytest.raises(CheckpointError, match=r"key .* is missing"):
        saved.load("7")
    with pytest.raises(CheckpointError, match="no checkpoint of run 9"):
        CheckpointStore.for_run(tmp_path / "coordinator", "9").load("9")


def test_a_checkpoint_resumes_only_the_job_that_wrote_it(saved):
    checkpoint = saved.load("7")
    checkpoint.check_job(job(rounds=1))
    with pytest.raises(CheckpointError, match="another job"):
        checkpoint.check_job(job(rounds=2))
    assert checkpoint.job_config() == job(rounds=1)


def test_a_job_that_completed_its_rounds_resumes_to_its_results_without_training(saved, federation):
    """A coordinator that died after the last round's checkpoint, before writing results:
    resuming runs no round and gives back the recorded history and model."""
    checkpoint = saved.load("7")
    assert checkpoint.round == 1
    grid, source = federation(run_id=8)
    plan = Checkpointing(saved, "7", "8", resume=checkpoint)
    history = run_with(job(rounds=1), grid, source, plan)
    assert [r.round for r in history.rounds] == [1]
    assert history.central_releases == [3]
    assert history.model is not None and history.model.round == 1
    assert history.institutions["0"].rounds_trained == 1  # nobody trained again
