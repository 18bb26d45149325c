"""A deployed institution's image data: an NPZ of images or a folder of PNGs, checked against
the input shape the job's model takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from PIL import Image

from confide.client.data import file_fingerprint, local_data
from confide.privacy.instructions import RoundInstructions
from confide.tasks.config import ModelConfig, TaskConfig
from confide.tasks.datasets import DatasetError

LABELS = ["cat", "dog", "eel"]


def _instructions(shape: list[int]) -> RoundInstructions:
    return RoundInstructions(
        task=TaskConfig(name="digits-images", model=ModelConfig(kind="cnn")),
        shape=shape,
        labels=LABELS,
    )


def _load(path: Path, shape: list[int], state: RecordDict | None = None):  # type: ignore[no-untyped-def]
    return local_data(
        path,
        label_column="label",
        validation_fraction=0.25,
        instructions=_instructions(shape),
        institution="clinic",
        state=state,
    )


@pytest.fixture
def image_npz(tmp_path: Path) -> Path:
    """20 RGB 4x5 images of two of the job's three classes, labelled by name."""
    path = tmp_path / "images.npz"
    x = np.random.default_rng(0).random((20, 3, 4, 5))
    np.savez(path, X=x, y=np.array(["dog", "eel"] * 10))
    return path


def test_an_image_npz_is_loaded_with_the_jobs_classes(image_npz):
    local = _load(image_npz, [3, 4, 5])
    assert local.train.shape == (3, 4, 5)
    assert len(local.train) + len(local.validation) == 20
    assert local.train.classes == 3
    assert set(local.train.y.tolist()) == {1, 2}


@pytest.mark.parametrize(
    ("shape", "expected"), [([1, 4, 5], "1x4x5 images"), ([60], "60 feature columns")]
)
def test_images_of_another_shape_than_the_jobs_are_refused(image_npz, shape, expected):
    with pytest.raises(DatasetError) as caught:
        _load(image_npz, shape)
    message = str(caught.value)
    assert str(image_npz) in message
    assert f"3x4x5 images, the job's model takes {expected}" in message


def test_a_table_for_an_image_job_is_refused(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i},dog\n" for i in range(8)))
    with pytest.raises(DatasetError, match="2 feature columns, the job's model takes 1x2x1"):
        _load(path, [1, 2, 1])


def test_a_folder_of_pngs_is_loaded_and_fingerprinted_by_its_content(tmp_path):
    root = tmp_path / "images"
    for label in ("cat", "eel"):
        (root / label).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(np.full((2, 3), index, np.uint8), "L").save(
                root / label / f"{index}.png"
            )
    state = RecordDict()
    local = _load(root, [1, 2, 3], state)
    assert len(local.train) + len(local.validation) == 8
    assert set(np.concatenate([local.train.y, local.validation.y]).tolist()) == {0, 2}
    first = file_fingerprint(root, state)
    assert file_fingerprint(root, state) == first
    Image.fromarray(np.full((2, 3), 9, np.uint8), "L").save(root / "eel" / "0.png")
    assert file_fingerprint(root, state) != first
