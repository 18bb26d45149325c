"""The model kinds: the MLP (flat or flattened images) and the small GroupNorm CNN."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from confide.common.errors import DatasetError
from confide.privacy.trainer import check_model
from confide.tasks.config import ModelConfig, TaskConfig
from confide.tasks.models import build_cnn, build_mlp, build_model
from confide.tasks.registry import get_task

CNN = ModelConfig(kind="cnn", channels=[4, 8], groups=2, hidden=[])
IMAGES = (1, 8, 8)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


# --- the CNN --------------------------------------------------------------------------------------


def test_the_cnn_passes_opacus_model_check():
    check_model(build_cnn(CNN, shape=IMAGES, classes=10, seed=0))


def test_the_cnn_has_only_conv_groupnorm_and_linear_weights():
    model = build_cnn(ModelConfig(kind="cnn"), shape=(3, 16, 16), classes=4, seed=0)
    weighted = {type(m) for m in model.modules() if any(True for _ in m.parameters(False))}
    assert weighted == {nn.Conv2d, nn.GroupNorm, nn.Linear}


@pytest.mark.parametrize("head", ["flatten", "average"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 7), (2, 1, 1)])
def test_the_cnn_gives_one_logit_per_class_for_each_image(head, shape):
    config = CNN.model_copy(update={"head": head, "hidden": [6]})
    model = build_cnn(config, shape=shape, classes=3, seed=0)
    assert model(torch.zeros(5, *shape)).shape == (5, 3)


def test_the_cnn_pools_only_while_the_image_is_at_least_2x2():
    config = ModelConfig(kind="cnn", channels=[4, 4, 4], groups=2, hidden=[])
    model = build_cnn(config, shape=(1, 4, 4), classes=2, seed=0)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert model[-1].in_features == 4  # 4 channels of 1x1 after pooling 4x4 twice


def test_without_pooling_the_cnn_keeps_every_pixel():
    config = ModelConfig(kind="cnn", channels=[4, 4], groups=2, hidden=[], pool=False)
    model = build_cnn(config, shape=(1, 4, 4), classes=2, seed=0)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model[-1].in_features == 4 * 4 * 4


def test_the_same_seed_builds_the_same_cnn():
    first = _weights(build_cnn(CNN, shape=IMAGES, classes=10, seed=7))
    second = _weights(build_cnn(CNN, shape=IMAGES, classes=10, seed=7))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_different_seeds_build_different_cnns():
    first = _weights(build_cnn(CNN, shape=IMAGES, classes=10, seed=1))
    second = _weights(build_cnn(CNN, shape=IMAGES, classes=10, seed=2))
    convolutions = [key for key in first if key.endswith("weight") and first[key].ndim == 4]
    assert convolutions
    assert all(not torch.equal(first[key], second[key]) for key in convolutions)


def test_building_a_cnn_leaves_the_global_torch_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_cnn(CNN, shape=IMAGES, classes=10, seed=99)
    assert torch.equal(torch.rand(3), expected)


def test_a_cnn_on_flat_data_is_refused_saying_it_needs_images():
    with pytest.raises(DatasetError, match=r"needs images \(C, H, W\)"):
        build_cnn(CNN, shape=(64,), classes=10, seed=0)


# --- the MLP --------------------------------------------------------------------------------------


def test_the_mlp_on_flat_input_keeps_its_layers_and_state_dict_keys():
    model = build_mlp(ModelConfig(hidden=[16, 8]), shape=(64,), classes=10, seed=0)
    assert not any(isinstance(m, nn.Flatten) for m in model.modules())
    assert list(model.state_dict()) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]


def test_the_mlp_flattens_images_first():
    model = build_mlp(ModelConfig(hidden=[16]), shape=IMAGES, classes=10, seed=0)
    assert isinstance(model[0], nn.Flatten)
    assert model[1].in_features == 64
    assert model(torch.zeros(2, *IMAGES)).shape == (2, 10)


def test_the_mlp_on_images_starts_from_the_weights_it_has_on_the_flat_digits():
    flat = build_mlp(ModelConfig(), shape=(64,), classes=10, seed=3)
    images = build_mlp(ModelConfig(), shape=IMAGES, classes=10, seed=3)
    assert torch.equal(flat[0].weight, images[1].weight)


# --- build_model and the configuration ------------------------------------------------------------


def test_build_model_chooses_the_builder_by_the_model_kind():
    cnn = build_model(TaskConfig(name="digits-images", model=CNN), shape=IMAGES, classes=10, seed=0)
    mlp = build_model(TaskConfig(name="digits-images"), shape=IMAGES, classes=10, seed=0)
    assert any(isinstance(m, nn.Conv2d) for m in cnn.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in mlp.modules())


def test_a_task_builds_its_cnn_from_the_shape():
    config = TaskConfig(name="digits-images", model=CNN)
    model = get_task("digits-images").build_model(config, shape=IMAGES, classes=10, seed=0)
    assert model(torch.zeros(1, *IMAGES)).shape == (1, 10)


@pytest.mark.parametrize("task", ["digits", "breast-cancer", "synthetic"])
def test_a_cnn_for_a_task_of_flat_features_is_refused_when_the_config_is_read(task):
    with pytest.raises(ValidationError, match=f"needs images.*task '{task}' gives flat"):
        TaskConfig(name=task, model=ModelConfig(kind="cnn"))


def test_groups_must_divide_every_channel_count():
    with pytest.raises(ValidationError, match=r"groups = 4 must divide.*\[6\]"):
        ModelConfig(kind="cnn", channels=[8, 6], groups=4)


def test_an_even_kernel_is_refused():
    with pytest.raises(ValidationError, match="kernel_size must be odd"):
        ModelConfig(kind="cnn", kernel_size=4)


def test_cnn_settings_without_kind_cnn_are_refused():
    with pytest.raises(ValidationError, match="channels, groups: only a cnn reads these"):
        ModelConfig(channels=[8], groups=2)


def test_an_mlps_dump_leaves_the_cnn_settings_out_and_a_cnns_keeps_them():
    assert ModelConfig().model_dump() == {"hidden": [64], "activation": "tanh"}
    dumped = CNN.model_dump()
    assert dumped["kind"] == "cnn" and dumped["channels"] == [4, 8] and dumped["groups"] == 2
    assert ModelConfig.model_validate(dumped) == CNN
