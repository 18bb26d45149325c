"""PrivacyConfig and TrainConfig validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from confide.privacy.config import PrivacyConfig, TrainConfig


def test_enabled_privacy_with_neither_noise_source_is_refused():
    with pytest.raises(ValidationError, match=r"exactly one of privacy\.target_epsilon"):
        PrivacyConfig()


def test_enabled_privacy_with_both_noise_sources_is_refused():
    with pytest.raises(ValidationError, match=r"exactly one of privacy\.target_epsilon"):
        PrivacyConfig(target_epsilon=8.0, noise_multiplier=1.0)


@pytest.mark.parametrize(
    "noise", [{"target_epsilon": 8.0}, {"noise_multiplier": 1.1}], ids=["target", "sigma"]
)
def test_enabled_privacy_with_exactly_one_noise_source_is_accepted(noise):
    config = PrivacyConfig(**noise)
    assert config.enabled
    assert (config.target_epsilon is None) != (config.noise_multiplier is None)


def test_disabled_privacy_needs_no_noise_source():
    config = PrivacyConfig(enabled=False)
    assert not config.enabled
    assert config.target_epsilon is None
    assert config.noise_multiplier is None


def test_defaults_are_rdp_hooks_delta_1e_5_and_unit_clip():
    config = PrivacyConfig(noise_multiplier=1.0)
    assert config.delta == 1e-5
    assert config.max_grad_norm == 1.0
    assert config.accountant == "rdp"
    assert config.grad_sample_mode == "hooks"


@pytest.mark.parametrize("delta", [0.0, -1e-5, 1.0, 1.5])
def test_out_of_range_delta_is_refused(delta):
    with pytest.raises(ValidationError) as refused:
        PrivacyConfig(noise_multiplier=1.0, delta=delta)
    assert [error["loc"] for error in refused.value.errors()] == [("delta",)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_epsilon", 0.0),
        ("target_epsilon", 1001.0),
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("max_grad_norm", 0.0),
        ("accountant", "gdp"),
        ("grad_sample_mode", "magic"),
    ],
)
def test_out_of_range_privacy_values_are_refused_naming_the_field(field, value):
    noise = {} if field in ("target_epsilon", "noise_multiplier") else {"noise_multiplier": 1.0}
    with pytest.raises(ValidationError) as refused:
        PrivacyConfig(**noise, **{field: value})
    assert [error["loc"] for error in refused.value.errors()] == [(field,)]


def test_unknown_privacy_field_is_refused():
    with pytest.raises(ValidationError, match="epsilon"):
        PrivacyConfig(noise_multiplier=1.0, epsilon=3.0)


def test_privacy_config_is_frozen():
    config = PrivacyConfig(noise_multiplier=1.0)
    with pytest.raises(ValidationError):
        config.noise_multiplier = 2.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("local_epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("optimizer", "rmsprop"),
        ("momentum", 1.0),
    ],
)
def test_out_of_range_train_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as refused:
        TrainConfig(**{field: value})
    assert [error["loc"] for error in refused.value.errors()] == [(field,)]
