"""The model file: safetensors weights and the card that rebuilds, identifies and qualifies them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from confide.common.errors import ModelFileError
from confide.server.job import JobConfig
from confide.server.model_file import (
    CARD,
    WEIGHTS,
    InstitutionProvenance,
    check_continues,
    lineage_bound,
    lineage_of,
    load_model,
    read_card,
)
from confide.tasks.config import TaskConfig


def test_a_saved_model_reloads_with_the_same_outputs(saved_model, tmp_path: Path):
    card, original = saved_model(tmp_path)
    loaded, read = load_model(tmp_path / WEIGHTS)
    x = torch.rand(5, 64)
    original.eval()
    assert torch.equal(loaded(x), original(x))
    assert read == card
    assert read.weights.parameters == sum(p.numel() for p in original.state_dict().values())


def test_the_weights_file_holds_tensors_only_no_pickle(saved_model, tmp_path: Path):
    saved_model(tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    assert header["__metadata__"]["format"] == "confide.model/1"
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(header)
    # The rest is the tensors' raw bytes, exactly as many as the header declares.
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    assert len(data) == 8 + header_length + max(ends)


def test_changed_weights_are_refused_by_their_hash(saved_model, tmp_path: Path):
    saved_model(tmp_path)
    data = bytearray((tmp_path / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256"):
        load_model(tmp_path / WEIGHTS)


def test_a_model_without_its_card_is_refused(saved_model, tmp_path: Path):
    saved_model(tmp_path)
    (tmp_path / CARD).unlink()
    with pytest.raises(ModelFileError, match="no model card"):
        load_model(tmp_path / WEIGHTS)


def test_a_card_that_is_not_one_is_refused_with_the_field(saved_model, tmp_path: Path):
    saved_model(tmp_path)
    card = json.loads((tmp_path / CARD).read_text())
    del card["weights"]
    (tmp_path / CARD).write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="weights"):
        read_card(tmp_path)


def test_weights_that_do_not_fit_the_cards_architecture_are_refused(saved_model, tmp_path: Path):
    card, _ = saved_model(tmp_path)
    wider = card.model_copy(update={"task": {"name": "digits", "model": {"hidden": [32]}}})
    (tmp_path / CARD).write_text(wider.model_dump_json())
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(tmp_path)


def test_a_model_continues_only_with_its_own_task_and_architecture(saved_model, tmp_path: Path):
    card, _ = saved_model(tmp_path)
    check_continues(card, JobConfig(task=TaskConfig(name="digits")), what="m")
    with pytest.raises(ModelFileError, match=r"task\.model"):
        check_continues(
            card, JobConfig(task=TaskConfig(name="digits", model={"hidden": [8]})), what="m"
        )
    with pytest.raises(ModelFileError, match=r"task\.name"):
        check_continues(card, JobConfig(task=TaskConfig(name="breast-cancer")), what="m")


def test_the_lineage_lists_the_parent_then_its_own_ancestors(saved_model, tmp_path: Path):
    grandparent, _ = saved_model(tmp_path / "a", seed=1)
    parent, _ = saved_model(tmp_path / "b", seed=2)
    parent = parent.model_copy(update={"lineage": lineage_of(grandparent, "a.safetensors")})
    lineage = lineage_of(parent, "digits-mlp:2")
    assert [a.source for a in lineage] == ["digits-mlp:2", "a.safetensors"]
    assert [a.sha256 for a in lineage] == [parent.weights.sha256, grandparent.weights.sha256]
    assert lineage_of(None, None) == []


def test_the_bound_is_the_largest_ledger_epsilon_and_the_summed_central_epsilon(
    saved_model, tmp_path: Path
):
    parent, _ = saved_model(tmp_path / "a", central=1.5)
    child, _ = saved_model(tmp_path / "b", central=2.0)
    row = InstitutionProvenance(
        id="h", rounds_trained=1, epsilon=1.0, delta=1e-5, dataset_epsilon=3.0,
        dataset_delta=1e-5, dataset_accountant="rdp",
    )  # fmt: skip
    parent = parent.model_copy(
        update={"privacy": parent.privacy.model_copy(update={"institutions": [row]})}
    )
    grown = row.model_copy(update={"dataset_epsilon": 4.5, "dataset_delta": 1e-6})
    privacy = child.privacy.model_copy(update={"institutions": [grown]})
    bound = lineage_bound(privacy, lineage_of(parent, "p"))
    assert bound.sample_epsilon == 4.5 and bound.sample_delta == 1e-5
    assert bound.institution_level_epsilon == pytest.approx(3.5)
    assert bound.institution_level_delta == pytest.approx(2e-6)
    # An ancestor trained without DP, or released without central DP, leaves no bound.
    plain = parent.privacy.model_copy(update={"dp": False, "institution_level": None})
    unprotected = parent.model_copy(update={"privacy": plain})
    bound = lineage_bound(privacy, lineage_of(unprotected, "p"))
    assert bound.sample_epsilon == "unbounded"
    assert bound.institution_level_epsilon == "unbounded"
    # Without central DP anywhere there is no institution-level statement at all.
    alone = lineage_bound(privacy.model_copy(update={"institution_level": None}), [])
    assert alone.institution_level_epsilon is None and alone.sample_epsilon == 4.5


def test_a_card_whose_labels_or_shape_do_not_fit_is_refused(saved_model, tmp_path: Path):
    saved_model(tmp_path)
    original = json.loads((tmp_path / CARD).read_text())
    for change in ({"labels": ["a", "b"]}, {"input_shape": [-64]}, {"classes": 10**9}):
        (tmp_path / CARD).write_text(json.dumps(original | change))
        with pytest.raises(ModelFileError, match="not a confide model card"):
            load_model(tmp_path)


def test_a_card_cannot_point_its_weights_outside_its_own_folder(saved_model, tmp_path: Path):
    saved_model(tmp_path / "model")
    (tmp_path / "secret.safetensors").write_bytes(b"not yours")
    card = json.loads((tmp_path / "model" / CARD).read_text())
    for name in ("../secret.safetensors", "/tmp/secret.safetensors", "model.pkl"):
        card["weights"]["file"] = name
        (tmp_path / "model" / CARD).write_text(json.dumps(card))
        with pytest.raises(ModelFileError, match=r"weights\.file"):
            load_model(tmp_path / "model")
