"""Images through the privacy layer: DP-SGD on a CNN, the input shape in the round
instructions, and the fingerprint of a folder of images."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from rounds import train_round

from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.instructions import RoundInstructions
from confide.privacy.ledger import fingerprint_file
from confide.tasks.config import ModelConfig
from confide.tasks.datasets import Dataset, load_digits_images
from confide.tasks.models import build_cnn


@pytest.fixture(scope="module")
def small_images() -> Dataset:
    """100 digits as 1x8x8 images."""
    return load_digits_images().subset(torch.arange(100).numpy())


def test_one_dp_sgd_round_trains_a_cnn_on_images(small_images):
    model = build_cnn(
        ModelConfig(kind="cnn", channels=[4, 8], groups=2, hidden=[]),
        shape=small_images.shape,
        classes=10,
        seed=0,
    )
    before = {key: value.clone() for key, value in model.state_dict().items()}
    result = train_round(
        model,
        small_images,
        train=TrainConfig(batch_size=20, lr=0.5),
        privacy=PrivacyConfig(noise_multiplier=1.0),
        history=[],
        planned_rounds=3,
        seed=0,
    )
    assert result.steps == 5  # q = 20 / 100
    assert 0 < result.epsilon < math.inf
    assert result.state.keys() == before.keys()
    assert all(not torch.equal(before[key], result.state[key]) for key in before)
    assert all(torch.isfinite(value).all() for value in result.state.values())


# --- the input shape in the round instructions ----------------------------------------------------


def test_the_input_shape_travels_in_the_flat_config():
    sent = RoundInstructions(shape=[1, 8, 8], features=64, labels=["a", "b"])
    received = RoundInstructions.from_config(sent.to_config())
    assert received.shape == [1, 8, 8]
    assert received.input_shape() == (1, 8, 8)


def test_features_alone_stand_for_a_flat_input_shape():
    assert RoundInstructions(features=30).input_shape() == (30,)
    assert RoundInstructions().input_shape() is None


@pytest.mark.parametrize("shape", [[], [1, 2, 3, 4], [0, 8], [100_001]])
def test_a_shape_out_of_range_is_refused(shape):
    with pytest.raises(ValidationError, match="shape"):
        RoundInstructions(shape=shape)


def test_a_shape_that_disagrees_with_features_is_refused():
    with pytest.raises(ValidationError, match=r"shape \[1, 8, 8\] holds 64 values"):
        RoundInstructions(shape=[1, 8, 8], features=60)


# --- fingerprints ---------------------------------------------------------------------------------


def test_a_folder_is_fingerprinted_by_its_files_names_and_content(tmp_path):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "0.png").write_bytes(b"one")
    (folder / "b").mkdir()
    (folder / "b" / "0.png").write_bytes(b"two")
    first = fingerprint_file(folder)
    assert first.startswith("sha256:")
    (folder / ".DS_Store").write_bytes(b"ignored")
    assert fingerprint_file(folder) == first
    (folder / "b" / "0.png").write_bytes(b"TWO")
    assert fingerprint_file(folder) != first
    (folder / "b" / "0.png").write_bytes(b"two")
    (folder / "b" / "0.png").rename(folder / "b" / "1.png")
    assert fingerprint_file(folder) != first


def test_a_single_files_fingerprint_is_the_sha256_of_its_bytes(tmp_path):
    import hashlib

    path = tmp_path / "data.csv"
    path.write_bytes(b"a,label\n1,0\n")
    assert fingerprint_file(path) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
