"""The coordinator's model registry: versions per name, immutable, checked on every read; and
the deployed ServerApp registering its model and continuing a registered version."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
from test_server_deployed_results import RUN_CONFIG, PushPull, context

from confide.common.errors import RegistryError
from confide.privacy.ledger import Ledger
from confide.server.app import Deployment, JobFailed, _deployed_run
from confide.server.flower import RESULTS_ENV, STATE_ENV
from confide.server.model_file import CARD, WEIGHTS, read_card
from confide.server.model_registry import ModelRegistry, parse_reference
from confide.server.settings import StateDir
from confide.server.state import InstitutionRow, open_database


@pytest.fixture
def state(state_dir: StateDir) -> StateDir:
    return state_dir


@pytest.fixture
def registry(state: StateDir):
    engine = open_database(state.database_url(state.load_settings()))
    yield ModelRegistry(state, engine)
    engine.dispose()


def _weights(folder: Path) -> bytes:
    return (folder / WEIGHTS).read_bytes()


def test_versions_are_numbered_per_name_and_their_files_are_read_only(
    saved_model, registry, tmp_path
):
    card, _ = saved_model(tmp_path / "m")
    data = _weights(tmp_path / "m")
    first = registry.register("digits-mlp", card, data)
    second = registry.register("digits-mlp", card, data)
    other = registry.register("wine", card, data)
    assert [(c.registry.name, c.registry.version) for c in (first, second, other)] == [
        ("digits-mlp", 1),
        ("digits-mlp", 2),
        ("wine", 1),
    ]
    assert [m.reference for m in registry.versions()] == ["digits-mlp:1", "digits-mlp:2", "wine:1"]
    assert [m.reference for m in registry.versions("wine")] == ["wine:1"]
    folder = registry.folder_of(registry.get("digits-mlp:2"))
    assert read_card(folder).registry.version == 2
    for name in (WEIGHTS, CARD):
        assert not os.access(folder / name, os.W_OK) or os.geteuid() == 0
        assert (folder / name).stat().st_mode & 0o222 == 0


def test_an_unknown_version_or_a_malformed_reference_is_refused_with_what_exists(
    saved_model, registry, tmp_path
):
    card, _ = saved_model(tmp_path / "m")
    registry.register("digits-mlp", card, _weights(tmp_path / "m"))
    with pytest.raises(RegistryError, match="digits-mlp has versions 1 to 1"):
        registry.get("digits-mlp:4")
    with pytest.raises(RegistryError, match="no model is named wine"):
        registry.get("wine:1")
    for bad in ("digits-mlp", "digits-mlp:0", "digits-mlp:x", ":1", "../x:1"):
        with pytest.raises(RegistryError, match="NAME:VERSION"):
            parse_reference(bad)


def test_export_copies_checked_files_and_never_overwrites(saved_model, registry, tmp_path):
    card, _ = saved_model(tmp_path / "m")
    registry.register("digits-mlp", card, _weights(tmp_path / "m"))
    out = tmp_path / "out"
    paths = registry.export("digits-mlp:1", out)
    assert sorted(p.name for p in paths) == sorted([WEIGHTS, CARD])
    assert (out / WEIGHTS).read_bytes() == _weights(tmp_path / "m")
    with pytest.raises(RegistryError, match="already exist"):
        registry.export("digits-mlp:1", out)


def test_a_registered_file_that_was_changed_is_refused(saved_model, registry, tmp_path):
    card, _ = saved_model(tmp_path / "m")
    registry.register("digits-mlp", card, _weights(tmp_path / "m"))
    weights = registry.folder_of(registry.get("digits-mlp:1")) / WEIGHTS
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="SHA-256"):
        registry.load("digits-mlp:1")
    with pytest.raises(RegistryError, match="SHA-256"):
        registry.export("digits-mlp:1", tmp_path / "out")


def test_a_folder_left_without_its_row_by_a_crash_is_replaced(saved_model, registry, tmp_path):
    card, _ = saved_model(tmp_path / "m")
    leftover = registry.folder / "digits-mlp" / "1"
    leftover.mkdir(parents=True)
    (leftover / WEIGHTS).write_bytes(b"half written")
    registered = registry.register("digits-mlp", card, _weights(tmp_path / "m"))
    assert registered.registry.version == 1
    _, weights = registry.load("digits-mlp:1")
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# -- the deployed ServerApp ----------------------------------------------------------------------
@pytest.fixture
def coordinator(state: StateDir, monkeypatch: pytest.MonkeyPatch):
    """A coordinator state with institutions 0, 1 and 2 enrolled as the in-process grid's
    nodes 100, 101 and 102."""
    monkeypatch.delenv(RESULTS_ENV, raising=False)
    monkeypatch.delenv(STATE_ENV, raising=False)
    engine = open_database(state.database_url(state.load_settings()))
    from sqlalchemy.orm import Session

    now = datetime.datetime.now(datetime.UTC)
    with Session(engine) as session, session.begin():
        for index in range(3):
            session.add(
                InstitutionRow(
                    name=str(index), node_id=str(100 + index), public_key=b"k", registered_at=now
                )
            )
    engine.dispose()
    return state


def _deployed(state: StateDir, grid, run_id: int, **extra: str) -> dict:  # type: ignore[no-untyped-def]
    deployment = Deployment(state.root)
    try:
        _deployed_run(deployment, PushPull(grid), context(RUN_CONFIG | extra, run_id=run_id))
    finally:
        deployment.close()
    return json.loads((state.runs / f"run-{run_id}" / "results.json").read_text())


@pytest.mark.usefixtures("inside_a_run")
def test_a_deployed_run_registers_its_model_and_a_job_continues_it(coordinator, federation):
    grid, _ = federation(state="ledgers")
    first = _deployed(coordinator, grid, 7)
    assert first["model"]["registered"] == "digits-mlp:1"
    run_folder = coordinator.runs / "run-7"
    card = read_card(run_folder)
    assert card.registry.version == 1 and card.run.kind == "deployment" and card.run.run == "7"
    assert card.weights.sha256 == first["model"]["sha256"]
    assert card.metrics["accuracy"] == first["final"]["accuracy"]
    assert [row.id for row in card.privacy.institutions] == ["0", "1", "2"]
    # Each institution committed to its data under its own ledger key: the commitment is
    # what its ledger computes for the data it recorded, and differs between institutions.
    for row, index in zip(card.privacy.institutions, range(3), strict=True):
        ledger = Ledger(coordinator.root.parent / "ledgers" / f"institution-{index}")
        (spend,) = [e for e in ledger.entries() if e.kind == "spend"]
        assert row.data_commitment == ledger.commitment(spend.fingerprint)
    assert len({row.data_commitment for row in card.privacy.institutions}) == 3

    second = _deployed(coordinator, grid, 8, **{"model.init": "digits-mlp:1"})
    assert second["model"]["registered"] == "digits-mlp:2"
    # It started from version 1: its initial metrics are version 1's final ones.
    assert second["initial"]["accuracy"] == first["final"]["accuracy"]
    continued = read_card(coordinator.runs / "run-8")
    assert [(a.source, a.sha256) for a in continued.lineage] == [
        ("digits-mlp:1", card.weights.sha256)
    ]
    # The institutions' ledgers kept counting: each dataset's epsilon grew.
    for before, after in zip(
        card.privacy.institutions, continued.privacy.institutions, strict=True
    ):
        assert after.dataset_epsilon > before.dataset_epsilon


@pytest.mark.usefixtures("inside_a_run")
def test_a_job_naming_a_version_the_registry_lacks_fails_before_any_round(coordinator, federation):
    grid, _ = federation()
    with pytest.raises(JobFailed, match="digits-mlp:5: not registered"):
        _deployed(coordinator, grid, 9, **{"model.init": "digits-mlp:5"})
    assert not (coordinator.runs / "run-9").exists()
    with pytest.raises(JobFailed, match="registered version"):
        _deployed(coordinator, grid, 10, **{"model.init": "/tmp/model.safetensors"})


def test_weights_registered_load_as_tensors(saved_model, registry, tmp_path):
    card, model = saved_model(tmp_path / "m")
    registry.register("digits-mlp", card, _weights(tmp_path / "m"))
    _, weights = registry.load("digits-mlp:1")
    for name, value in model.state_dict().items():
        assert torch.equal(weights[name], value)


def test_a_registered_card_that_was_edited_is_refused_and_never_exported(
    saved_model, registry, tmp_path
):
    card, _ = saved_model(tmp_path / "m")
    registry.register("digits-mlp", card, _weights(tmp_path / "m"))
    on_disk = registry.folder_of(registry.get("digits-mlp:1")) / CARD
    on_disk.chmod(0o644)
    edited = json.loads(on_disk.read_text())
    edited["bound"]["sample_epsilon"] = 0.01  # a smaller epsilon than was spent
    on_disk.write_text(json.dumps(edited))
    with pytest.raises(RegistryError, match="not the card registered"):
        registry.export("digits-mlp:1", tmp_path / "out")
    assert not (tmp_path / "out" / CARD).exists()
    assert registry.get("digits-mlp:1").card.bound.sample_epsilon == 2.0  # the row's


def test_a_model_name_that_is_not_one_is_refused(saved_model, registry, tmp_path):
    card, _ = saved_model(tmp_path / "m")
    for name in ("Digits", "../x", "", "a/b"):
        with pytest.raises(RegistryError, match="not a model name"):
            registry.register(name, card, _weights(tmp_path / "m"))
