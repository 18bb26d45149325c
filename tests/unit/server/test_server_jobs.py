"""Jobs as `confide-server submit` prepares them, and how the deployed ServerApp reads them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from confide.server.app import job_from_run_config
from confide.server.jobs import JobError, load_job, write_app
from confide.server.settings import StateDir

JOB = """
name = "trial"
seed = 4
[task]
name = "csv"
path = "data/eval.csv"
[federation]
rounds = 3
"""


def test_a_relative_task_path_is_taken_from_the_job_files_folder(tmp_path: Path):
    (tmp_path / "job.toml").write_text(JOB)
    job, ignored = load_job(tmp_path / "job.toml")
    assert job.task.path == (tmp_path / "data" / "eval.csv").resolve()
    assert not ignored and job.name == "trial"


def test_a_scenario_file_is_accepted_and_its_simulation_table_reported(tmp_path: Path):
    (tmp_path / "s.toml").write_text('[simulation]\ninstitutions = 3\n[task]\nname = "digits"\n')
    job, ignored = load_job(tmp_path / "s.toml")
    assert ignored and job.name == "s"


def test_a_bad_job_is_refused_with_the_file_and_field(tmp_path: Path):
    (tmp_path / "bad.toml").write_text("[federation]\nrounds = 0\n")
    with pytest.raises(JobError, match=r"(?s)bad\.toml: invalid job.*federation\.rounds"):
        load_job(tmp_path / "bad.toml")


def test_the_app_carries_the_whole_job_and_the_serverapp_reads_it_back(tmp_path: Path):
    (tmp_path / "job.toml").write_text(JOB)
    job, _ = load_job(tmp_path / "job.toml")
    folder = write_app(StateDir(tmp_path / "state"), job)
    pyproject = tomllib.loads((folder / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "confide.server.app:app",
        "clientapp": "confide.client.app:app",
    }
    name, read = job_from_run_config(app["config"])
    assert name == "trial" and read == job.job()


def test_a_run_config_that_breaks_the_schema_names_the_field():
    with pytest.raises(ValueError, match=r"federation\.rounds"):
        job_from_run_config({"confide-job": '{"federation": {"rounds": -1}}'})


def test_any_job_name_becomes_an_app_name_flower_accepts():
    from confide.server.jobs import flower_app_name

    assert flower_app_name("digits-dp") == "digits-dp"
    assert flower_app_name("2024_Trial.v2") == "job-2024-trial-v2"
    assert len(flower_app_name("a" * 64)) == 32


def test_institutions_are_told_the_name_of_the_coordinators_file_not_its_path(tmp_path: Path):
    (tmp_path / "job.toml").write_text(JOB)
    job, _ = load_job(tmp_path / "job.toml")
    assert job.instructions().task.path == Path("eval.csv")


def fab_members(folder: Path) -> list[str]:
    """The files Flower packs from `folder` (its own builder, as `flwr run` uses it)."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    return sorted(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(folder))).namelist())


def test_a_submitted_app_is_exactly_what_institutions_accept_and_carries_no_secret(
    tmp_path: Path,
):
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.fab import Fab

    from confide.client.app_check import check_app

    (tmp_path / "job.toml").write_text(JOB)
    job, _ = load_job(tmp_path / "job.toml")
    state = StateDir(tmp_path / "state")
    state.root.mkdir()
    (state.root / "ca.key").write_text("secret")
    folder = write_app(state, job)
    assert fab_members(folder) == [".info/CONTENT", "pyproject.toml"]
    content = build_fab_from_disk(folder)
    digest = hashlib.sha256(content).hexdigest()
    check_app(Fab(digest, content, {}), digest)  # AppRefused if an institution would refuse it


def test_the_repositorys_gitignore_keeps_walkthrough_secrets_out_of_a_flower_app(tmp_path: Path):
    repository = Path(__file__).resolve().parents[3]
    for name in ("pyproject.toml", ".gitignore"):
        (tmp_path / name).write_bytes((repository / name).read_bytes())
    secrets = [
        "coordinator-state/settings.toml",
        "hospital-a-state/institution.toml",
        "confide-demo/hospital-a/ledgers.json",
        "hospital-a.token",
        "keys/node.key",
    ]
    for name in secrets:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("secret")
    assert not set(secrets) & set(fab_members(tmp_path))


def test_waiting_for_institutions_says_so_even_when_one_listing_outlasts_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Found by CI: one `flwr supernode list` took longer than `--wait 3` on a loaded machine,
    # so the operator who asked to wait was refused without a word about waiting.
    import time

    import confide.server.jobs as jobs

    def slow_listing(directory: StateDir) -> list[str]:
        time.sleep(0.3)
        return ["train-0"]

    monkeypatch.setattr(jobs, "online_institutions", slow_listing)
    (tmp_path / "job.toml").write_text(JOB + "min_available = 2\n")
    job, _ = load_job(tmp_path / "job.toml")
    said: list[str] = []
    with pytest.raises(JobError, match="needs 2 institutions online"):
        jobs.wait_for_institutions(StateDir(tmp_path), job, wait=0.2, say=said.append)
    assert said and said[0].startswith("waiting for institutions: 1 of 2 online")


def test_resume_is_refused_while_a_run_of_the_job_is_still_running_and_waits_when_asked(
    monkeypatch, state_dir
):
    """Review finding: `resume` against a live job (or twice) ran the job twice. Flower's
    list of runs (`flwr ls`, read by `jobs.runs`) is replaced by what it would say."""
    from confide.common.errors import JobError
    from confide.server import jobs

    listed = [
        [{"run-id": "7", "status": "finished:failed"}, {"run-id": "9", "status": "running"}],
        [{"run-id": "7", "status": "finished:failed"}, {"run-id": "9", "status": "running"}],
        [
            {"run-id": "7", "status": "finished:failed"},
            {"run-id": "9", "status": "finished:completed"},
        ],
    ]
    calls: list[int] = []

    def flower_list(directory, run_id=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        return listed[min(len(calls) - 1, len(listed) - 1)]

    monkeypatch.setattr(jobs, "runs", flower_list)
    said: list[str] = []
    with pytest.raises(JobError, match=r"run 9 of this job is running: resuming now would run"):
        jobs._wait_while_running(state_dir, 7, [9], wait=0.0, say=said.append)
    # Asked to wait, it waits until the run has ended.
    jobs._wait_while_running(state_dir, 7, [9], wait=30.0, say=said.append)
    assert said == ["waiting for run 9 (running) to end ..."]
    # Runs of other jobs do not count.
    calls.clear()
    jobs._wait_while_running(state_dir, 8, [], wait=0.0, say=said.append)
