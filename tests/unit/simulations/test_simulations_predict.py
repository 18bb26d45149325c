"""`confide-simulate predict`: a saved model scores its own test set, a labelled file or an
unlabelled one; files that do not fit the model are refused with what and where."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli

from confide.common.errors import DatasetError, ModelFileError
from confide.simulations.predict import predict, write_predictions
from confide.tasks.config import DataConfig, TaskConfig
from confide.tasks.metrics import evaluate
from confide.tasks.splits import split_test


def _csv(path: Path, x: np.ndarray, y: np.ndarray | None) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            [*(f"p{j}" for j in range(x.shape[1])), *(["label"] if y is not None else [])]
        )
        for index, row in enumerate(x):
            writer.writerow(
                [*(f"{v:.6f}" for v in row), *([str(y[index])] if y is not None else [])]
            )
    return path


def test_without_data_the_model_scores_its_runs_held_out_test_set(saved_model, tmp_path):
    _, model = saved_model(tmp_path)
    scored = predict(tmp_path / "model.safetensors")
    test = split_test(TaskConfig(name="digits"), DataConfig(), 0)[1]
    assert scored.metrics == evaluate(model, test.x, test.y, classes=10)
    assert len(scored.predicted) == len(test) and scored.probabilities.shape == (len(test), 10)
    assert np.allclose(scored.probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_labelled_csv_is_scored_with_metrics_and_an_unlabelled_one_without(saved_model, tmp_path):
    _, model = saved_model(tmp_path)
    test = split_test(TaskConfig(name="digits"), DataConfig(), 0)[1]
    labelled = predict(tmp_path / "model.safetensors", _csv(tmp_path / "a.csv", test.x, test.y))
    assert labelled.metrics is not None
    assert labelled.metrics["accuracy"] == pytest.approx(
        evaluate(model, test.x, test.y, classes=10)["accuracy"]
    )
    unlabelled = predict(tmp_path / "model.safetensors", _csv(tmp_path / "b.csv", test.x, None))
    assert unlabelled.metrics is None and unlabelled.labels is None
    with torch.no_grad():
        expected = model(torch.as_tensor(test.x)).argmax(dim=1).numpy()
    assert np.array_equal(unlabelled.predicted, expected)
    write_predictions(tmp_path / "preds.csv", labelled)
    rows = list(csv.DictReader((tmp_path / "preds.csv").open()))
    assert len(rows) == len(test)
    assert set(rows[0]) == {"prediction", *(f"p_{k}" for k in range(10)), "label"}
    assert rows[0]["label"] == str(test.y[0])


def test_data_of_another_width_is_refused_naming_the_file_and_the_shapes(saved_model, tmp_path):
    saved_model(tmp_path)
    narrow = _csv(tmp_path / "narrow.csv", np.zeros((3, 5), dtype=np.float32), None)
    with pytest.raises(
        DatasetError, match=r"narrow\.csv: examples of shape \[5\], the model takes \[64\]"
    ):
        predict(tmp_path / "model.safetensors", narrow)


def test_the_cli_refuses_a_missing_or_changed_model_with_exit_2(saved_model, tmp_path):
    missing = cli("confide-simulate", "predict", str(tmp_path / "none" / "model.safetensors"))
    assert missing.returncode == 2 and "no model card" in missing.stderr
    saved_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    changed = cli("confide-simulate", "predict", str(weights))
    assert changed.returncode == 2 and "SHA-256" in changed.stderr
    with pytest.raises(ModelFileError):
        predict(weights)


def test_a_held_out_set_other_than_the_one_the_run_scored_is_refused(saved_model, tmp_path):
    saved_model(tmp_path)
    card = json.loads((tmp_path / "model.json").read_text())
    card["data"]["test_fraction"] = 0.3  # the card now describes another split
    (tmp_path / "model.json").write_text(json.dumps(card))
    with pytest.raises(DatasetError, match="not the test set the model's run scored"):
        predict(tmp_path / "model.safetensors")
