"""RoundInstructions: flat ConfigRecord-style dicts and back, with field-named refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from confide.privacy.config import PrivacyConfig, TrainConfig
from confide.privacy.instructions import PREFIX, RoundInstructions
from confide.tasks.config import ModelConfig, TaskConfig


@pytest.fixture
def custom() -> RoundInstructions:
    return RoundInstructions(
        task=TaskConfig(
            name="csv",
            path=Path("/data/site a/cohort.csv"),
            label_column="outcome",
            model=ModelConfig(hidden=[]),
        ),
        train=TrainConfig(local_epochs=3, batch_size=16, lr=0.05, optimizer="adam"),
        privacy=PrivacyConfig(
            noise_multiplier=1.3, delta=1e-6, max_grad_norm=0.5, accountant="prv"
        ),
        rounds=7,
        seed=42,
    )


def test_default_instructions_round_trip():
    instructions = RoundInstructions()
    assert RoundInstructions.from_config(instructions.to_config()) == instructions


def test_custom_instructions_with_path_and_no_hidden_layers_round_trip(custom):
    back = RoundInstructions.from_config(custom.to_config())
    assert back == custom
    assert back.task.path == Path("/data/site a/cohort.csv")
    assert back.task.model.hidden == []
    assert back.privacy.target_epsilon is None
    assert back.privacy.noise_multiplier == 1.3


def test_to_config_is_flat_prefixed_and_omits_none(custom):
    config = custom.to_config()
    assert all(key.startswith(PREFIX) for key in config)
    assert not any(isinstance(value, dict) for value in config.values())
    assert config["confide.task.path"] == "/data/site a/cohort.csv"
    assert config["confide.task.model.hidden"] == []
    assert config["confide.privacy.noise_multiplier"] == 1.3
    assert config["confide.train.lr"] == 0.05
    assert config["confide.rounds"] == 7
    assert "confide.privacy.target_epsilon" not in config
    assert None not in config.values()


def test_from_config_ignores_keys_outside_the_prefix(custom):
    config = custom.to_config() | {"server-round": 3, "other.lr": "not a number"}
    assert RoundInstructions.from_config(config) == custom


@pytest.mark.parametrize(
    ("key", "value", "location"),
    [
        ("confide.train.lr", -1.0, ("train", "lr")),
        ("confide.train.lr", "fast", ("train", "lr")),
        ("confide.train.batch_size", 0, ("train", "batch_size")),
        ("confide.train.optimizer", "rmsprop", ("train", "optimizer")),
        ("confide.privacy.delta", 2.0, ("privacy", "delta")),
        ("confide.privacy.noise_multiplier", 0.0, ("privacy", "noise_multiplier")),
        ("confide.privacy.accountant", "moments", ("privacy", "accountant")),
        ("confide.rounds", 0, ("rounds",)),
        ("confide.seed", -1, ("seed",)),
        ("confide.task.samples", 5, ("task", "samples")),
    ],
)
def test_bad_value_in_flat_config_is_refused_naming_the_field(custom, key, value, location):
    config = custom.to_config() | {key: value}
    with pytest.raises(ValidationError) as refused:
        RoundInstructions.from_config(config)
    assert [error["loc"] for error in refused.value.errors()] == [location]
    assert ".".join(location) in str(refused.value)


def test_unknown_key_in_flat_config_is_refused_naming_it(custom):
    config = custom.to_config() | {"confide.train.learning_rate": 0.1}
    with pytest.raises(ValidationError) as refused:
        RoundInstructions.from_config(config)
    assert [error["loc"] for error in refused.value.errors()] == [("train", "learning_rate")]


def test_flat_config_with_both_noise_sources_is_refused(custom):
    config = custom.to_config() | {"confide.privacy.target_epsilon": 4.0}
    with pytest.raises(ValidationError, match=r"exactly one of privacy\.target_epsilon") as refused:
        RoundInstructions.from_config(config)
    assert [error["loc"] for error in refused.value.errors()] == [("privacy",)]


def test_flat_config_for_a_file_task_without_path_is_refused(custom):
    config = {k: v for k, v in custom.to_config().items() if k != "confide.task.path"}
    with pytest.raises(ValidationError, match=r"set task\.path"):
        RoundInstructions.from_config(config)


def test_disabled_privacy_round_trips_without_noise_source():
    instructions = RoundInstructions(privacy=PrivacyConfig(enabled=False))
    config = instructions.to_config()
    assert config["confide.privacy.enabled"] is False
    assert "confide.privacy.target_epsilon" not in config
    assert RoundInstructions.from_config(config) == instructions
