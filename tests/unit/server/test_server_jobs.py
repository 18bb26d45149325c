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
