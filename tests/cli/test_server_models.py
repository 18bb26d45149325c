"""`confide-server models list|show|export` and a job's `[model] init`, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from helpers import cli

from confide.server.model_registry import ModelRegistry
from confide.server.settings import StateDir
from confide.server.state import open_database


def server(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("confide-server", *args)


def _registered(saved_model, tmp_path: Path, versions: int) -> Path:  # type: ignore[no-untyped-def]
    """A coordinator state whose registry holds `versions` versions of digits-mlp."""
    state = tmp_path / "state"
    assert server("init", "--dir", str(state)).returncode == 0
    directory = StateDir(state)
    engine = open_database(directory.database_url(directory.load_settings()))
    registry = ModelRegistry(directory, engine)
    for seed in range(versions):
        card, _ = saved_model(tmp_path / f"m{seed}", seed=seed)
        registry.register(
            "digits-mlp", card, (tmp_path / f"m{seed}" / "model.safetensors").read_bytes()
        )
    engine.dispose()
    return state


def test_list_show_and_export_a_registered_version(saved_model, tmp_path):
    state = _registered(saved_model, tmp_path, 2)
    listed = server("models", "list", "--dir", str(state))
    assert listed.returncode == 0, listed.stderr
    assert "digits-mlp:1" in listed.stdout and "digits-mlp:2" in listed.stdout
    rows = [
        json.loads(line)
        for line in server("models", "list", "--dir", str(state), "--json").stdout.splitlines()
    ]
    assert [row["version"] for row in rows] == ["digits-mlp:1", "digits-mlp:2"]
    shown = server("models", "show", "digits-mlp:2", "--dir", str(state))
    assert shown.returncode == 0, shown.stderr
    card = json.loads(shown.stdout)
    assert card["registry"] == {"name": "digits-mlp", "version": 2}
    assert card["weights"]["sha256"] == rows[1]["sha256"]
    out = tmp_path / "exported"
    exported = server("models", "export", "digits-mlp:2", "--dir", str(state), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert json.loads((out / "model.json").read_text())["weights"]["sha256"] == rows[1]["sha256"]
    again = server("models", "export", "digits-mlp:2", "--dir", str(state), "--out", str(out))
    assert again.returncode == 2 and "already exist" in again.stderr


def test_unknown_or_malformed_versions_are_refused_with_exit_2(saved_model, tmp_path):
    state = _registered(saved_model, tmp_path, 1)
    unknown = server("models", "show", "digits-mlp:9", "--dir", str(state))
    assert unknown.returncode == 2 and "digits-mlp has versions 1 to 1" in unknown.stderr
    malformed = server(
        "models", "export", "latest", "--dir", str(state), "--out", str(tmp_path / "o")
    )
    assert malformed.returncode == 2 and "NAME:VERSION" in malformed.stderr
    nowhere = server("models", "list", "--dir", str(tmp_path / "nowhere"))
    assert nowhere.returncode == 2 and "confide-server init" in nowhere.stderr


def test_submit_refuses_a_job_continuing_a_version_that_does_not_exist_or_fit(
    saved_model, tmp_path
):
    state = _registered(saved_model, tmp_path, 1)
    job = tmp_path / "job.toml"
    for init, expected in (
        ("digits-mlp:4", "not registered"),
        ("some/file.safetensors", "NAME:VERSION"),
    ):
        job.write_text(f'[model]\ninit = "{init}"\n')
        refused = server("submit", str(job), "--dir", str(state))
        assert refused.returncode == 2 and expected in refused.stderr, refused.stderr
    job.write_text(
        '[model]\ninit = "digits-mlp:1"\n[task]\nname = "digits"\nmodel = { hidden = [8] }\n'
    )
    refused = server("submit", str(job), "--dir", str(state))
    assert refused.returncode == 2 and "task.model" in refused.stderr, refused.stderr
    assert not StateDir(state).jobs.exists() or not any(StateDir(state).jobs.iterdir())
