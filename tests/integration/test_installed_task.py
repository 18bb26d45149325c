"""The worked example task package (docs/examples/confide-task-example), installed with pip
into a folder of its own and run through the real CLI: the scenario names the installed task,
its options and the opt-in model repair, and the run reports the task's own metric.

The package is installed with `pip --target` (never into the project's environment, where
it would be seen by every other test) and reached through PYTHONPATH, which the simulation's
Ray workers inherit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import cli, confide, environment, free_port, new_token, running_coordinator

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "confide-task-example"
SCENARIO = """
name = "stripes"
seed = 0

[task]
name = "example-stripes"
options = { samples = 2000, noise = 0.3, channels = 8 }
{fix}

[train]
lr = 0.5

[privacy]
enabled = true
noise_multiplier = 1.0
delta = 1e-5
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed by pip from a copy (a build writes into the source folder)."""
    pytest.importorskip("setuptools", reason="pip --no-build-isolation builds with setuptools")
    work = tmp_path_factory.mktemp("example")
    source = work / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    (info,) = target.glob("confide_task_example-*.dist-info")
    assert "example-stripes = confide_task_example:TASK" in (info / "entry_points.txt").read_text()
    return target


def _simulate(site: Path, folder: Path, *, fix: bool) -> subprocess.CompletedProcess[str]:
    folder.mkdir()
    scenario = folder / "stripes.toml"
    scenario.write_text(SCENARIO.replace("{fix}", "fix_model = true" if fix else ""))
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return cli(
        "confide-simulate", "run", str(scenario), "--rounds", "2", "--institutions", "2",
        "--quiet", "--out", str(folder / "out"),
        timeout=600, cwd=folder, env=environment(PYTHONPATH=path),
    )  # fmt: skip


def test_a_scenario_runs_the_installed_example_task(site, tmp_path):
    done = _simulate(site, tmp_path / "run", fix=True)

    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = (tmp_path / "run" / "out").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert len(results["rounds"]) == 2
    assert results["final"]["accuracy"] > 0.5  # four classes: chance is 0.25
    assert 0.0 <= results["final"]["metrics"]["worst_class_recall"] <= 1.0
    assert "worst_class_recall" in results["rounds"][-1]["federated_evaluation"]
    saved = tomllib.loads((run / "scenario.toml").read_text())["task"]
    assert saved["options"] == {"samples": 2000, "noise": 0.3, "channels": 8}
    assert saved["fix_model"] is True


def test_without_the_opt_in_the_batch_norm_model_is_refused_before_the_run(site, tmp_path):
    done = _simulate(site, tmp_path / "refused", fix=False)

    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join((done.stdout + done.stderr).split())
    assert "BatchNorm2d -> GroupNorm" in message
    assert "set task.fix_model = true" in message
    assert not (tmp_path / "refused" / "out").exists() or not any(
        (tmp_path / "refused" / "out").iterdir()
    )


JOB = """
name = "stripes-deployed"
seed = 0
[task]
name = "example-stripes"
options = { samples = 2000, noise = 0.3, channels = 8 }
fix_model = true
[train]
lr = 0.5
[privacy]
target_epsilon = 8.0
delta = 1e-5
[federation]
rounds = 2
min_available = 2
min_train = 2
min_evaluate = 2
timeout = 180
"""


def test_a_deployed_job_trains_the_installed_task_at_institutions_that_installed_it(site, tmp_path):
    """The coordinator and both institutions have the package (PYTHONPATH); the job names
    the task, each institution trains its own NPZ images with the task's model, the task's
    metric comes back, and the model is registered under the task's name."""
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    scenario = tmp_path / "stripes.toml"
    scenario.write_text(SCENARIO.replace("{fix}", "fix_model = true"))
    exported = cli(
        "confide-simulate", "export", str(scenario), "--institutions", "2",
        "--out", str(tmp_path / "data"), env=environment(PYTHONPATH=path),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stdout + exported.stderr
    state = tmp_path / "coordinator"
    with running_coordinator(state, env={"PYTHONPATH": path}) as coordinator:
        running = []
        try:
            for index in range(2):
                folder = tmp_path / f"site-{index}"
                joined = cli(
                    "confide-client", "join",
                    "--server", f"127.0.0.1:{coordinator['enrollment']}",
                    "--token", new_token(state, f"site-{index}"),
                    "--dir", str(folder),
                    "--data", str(tmp_path / "data" / f"institution-{index}.npz"),
                    "--port", str(free_port()), "--no-start",
                    env=environment(PYTHONPATH=path),
                )  # fmt: skip
                assert joined.returncode == 0, joined.stdout + joined.stderr
                running.append(
                    confide(
                        "confide-client start",
                        "--dir",
                        str(folder),
                        env=environment(PYTHONPATH=path),
                    )
                )
            for index, started in enumerate(running):
                started.wait_for(f"taking site-{index}'s tasks", 120)
            job = tmp_path / "job.toml"
            job.write_text(JOB)
            submitted = cli(
                "confide-server", "submit", str(job), "--dir", str(state), "--wait", "60",
                timeout=400, env=environment(PYTHONPATH=path),
            )  # fmt: skip
        finally:
            for started in running:
                started.finish()
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    (run,) = (state / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert [r["institutions_trained"] for r in results["rounds"]] == [2, 2]
    assert results["final"]["accuracy"] > 0.5  # four classes: chance is 0.25
    assert "worst_class_recall" in results["final"]["metrics"]
    assert "worst_class_recall" in results["rounds"][-1]["federated_evaluation"]
    assert results["model"]["registered"] == "example-stripes:1"
    card = json.loads((run / "model.json").read_text())
    assert card["input_shape"] == [1, 8, 8] and card["task"]["fix_model"] is True
