"""Image data: datasets of (n, C, H, W), 4-D NPZ archives and folders of PNG images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from confide.tasks.config import TaskConfig
from confide.tasks.datasets import (
    Dataset,
    DatasetError,
    load_digits,
    load_digits_images,
    load_file,
    load_image_folder,
    load_npz,
    read_file,
    to_npz,
)
from confide.tasks.registry import get_task


def _png(path: Path, pixels: np.ndarray, mode: str = "L") -> Path:
    """Save `pixels` (H, W) or (H, W, channels), uint8, as a PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode).save(path)
    return path


def _folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (4, 3)) -> Path:
    """`root` with one sub-folder per class holding that many grayscale PNGs of `size`
    (width, height); pixel values encode the class and the image's number."""
    width, height = size
    for number, (name, count) in enumerate(classes.items()):
        for index in range(count):
            pixels = np.full((height, width), 10 * number + index)
            _png(root / name / f"{index}.png", pixels)
    return root


# --- Dataset --------------------------------------------------------------------------------------


def test_an_image_dataset_has_its_shape_and_the_flat_feature_count():
    data = Dataset(np.zeros((5, 3, 4, 6), np.float32), np.zeros(5, np.int64), 2)
    assert data.shape == (3, 4, 6)
    assert data.features == 72
    assert len(data) == 5


def test_a_tabular_dataset_has_a_one_dimensional_shape():
    data = Dataset(np.zeros((5, 7), np.float32), np.zeros(5, np.int64), 2)
    assert data.shape == (7,)
    assert data.features == 7


def test_subset_and_concatenate_keep_the_image_shape():
    x = np.arange(4 * 2 * 2 * 2, dtype=np.float32).reshape(4, 2, 2, 2)
    data = Dataset(x, np.array([0, 1, 0, 1]), 2, ("a", "b"))
    part = data.subset(np.array([1, 3]))
    assert part.x.shape == (2, 2, 2, 2)
    np.testing.assert_array_equal(part.x[0], x[1])
    joined = Dataset.concatenate(part, data)
    assert joined.x.shape == (6, 2, 2, 2)
    assert joined.label_names == ("a", "b")


def test_digits_images_are_the_digits_as_1x8x8_images():
    flat, images = load_digits(), load_digits_images()
    assert images.x.shape == (1797, 1, 8, 8)
    assert images.shape == (1, 8, 8)
    np.testing.assert_array_equal(images.x.reshape(1797, 64), flat.x)
    np.testing.assert_array_equal(images.y, flat.y)
    assert images.label_names == flat.label_names


def test_the_digits_images_task_is_registered_without_a_path():
    task = get_task("digits-images")
    assert not task.needs_path
    assert task.load(TaskConfig(name="digits-images"), 0).shape == (1, 8, 8)


# --- NPZ ------------------------------------------------------------------------------------------


def test_npz_with_4d_x_loads_as_images(write_npz):
    x = np.random.default_rng(0).random((6, 3, 5, 4))
    path = write_npz(X=x, y=np.array(["cat", "dog"] * 3))
    data = load_npz(path)
    assert data.x.shape == (6, 3, 5, 4) and data.x.dtype == np.float32
    assert data.shape == (3, 5, 4)
    assert data.label_names == ("cat", "dog")
    np.testing.assert_allclose(data.x, x.astype(np.float32))


def test_the_npz_task_loads_image_arrays(write_npz):
    path = write_npz(X=np.zeros((4, 1, 2, 2)), y=np.array([0, 1, 0, 1]))
    assert get_task("npz").load(TaskConfig(name="npz", path=path), 0).shape == (1, 2, 2)


@pytest.mark.parametrize("shape", [(4, 2, 2), (4, 1, 2, 2, 2)])
def test_npz_x_of_three_or_five_dimensions_is_refused_naming_the_file_and_shape(write_npz, shape):
    path = write_npz(X=np.zeros(shape), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    message = str(caught.value)
    assert str(path) in message
    assert "4-D (examples, channels, height, width)" in message
    assert str(shape) in message


def test_npz_images_with_an_empty_dimension_are_refused(write_npz):
    path = write_npz(X=np.zeros((2, 1, 0, 3)), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"every size >= 1"):
        load_npz(path)


def test_a_non_finite_pixel_is_refused_with_its_position(write_npz):
    x = np.zeros((2, 1, 2, 2))
    x[1, 0, 1, 0] = np.nan
    path = write_npz(X=x, y=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"row 1, feature \(0, 1, 0\)"):
        load_npz(path)


def test_to_npz_writes_images_that_load_back_with_their_class_names(tmp_path):
    data = Dataset(np.ones((3, 1, 2, 2), np.float32), np.array([1, 0, 1]), 2, ("a", "b"))
    path = tmp_path / "out.npz"
    path.write_bytes(to_npz(data))
    again = load_npz(path, ("a", "b"))
    np.testing.assert_array_equal(again.x, data.x)
    np.testing.assert_array_equal(again.y, data.y)


# --- folders of PNG images ------------------------------------------------------------------------


def test_an_image_folder_loads_one_class_per_sorted_sub_folder(tmp_path):
    root = _folder(tmp_path / "images", {"zebra": 2, "ant": 3})
    data = load_image_folder(root)
    assert data.x.shape == (5, 1, 3, 4) and data.x.dtype == np.float32
    assert data.label_names == ("ant", "zebra")
    np.testing.assert_array_equal(data.y, [0, 0, 0, 1, 1])
    # Scaled by the 8-bit maximum, not by the data's range: zebra's images hold 0 and 1.
    np.testing.assert_allclose(data.x[3:, 0, 0, 0], [0 / 255, 1 / 255])
    np.testing.assert_allclose(data.x[:3, 0, 0, 0], [10 / 255, 11 / 255, 12 / 255])


def test_rgb_images_load_as_three_channels_first(tmp_path):
    pixels = np.zeros((2, 3, 3))
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 51, 0
    for name in ("a", "b"):
        _png(tmp_path / name / "0.png", pixels, "RGB")
    data = load_image_folder(tmp_path)
    assert data.shape == (3, 2, 3)
    np.testing.assert_allclose(data.x[0, :, 0, 0], [1.0, 0.2, 0.0])


def test_opaque_alpha_is_dropped_and_a_palette_is_read_as_rgb(tmp_path):
    _png(tmp_path / "a" / "0.png", np.full((2, 2, 4), 255), "RGBA")
    (tmp_path / "b").mkdir()
    palette = Image.fromarray(np.full((2, 2, 3), 255, np.uint8), "RGB").convert("P")
    palette.save(tmp_path / "b" / "0.png")
    data = load_image_folder(tmp_path)
    assert data.shape == (3, 2, 2)
    np.testing.assert_allclose(data.x, 1.0)


def test_grayscale_with_opaque_alpha_loads_as_one_channel(tmp_path):
    for name in ("a", "b"):
        _png(tmp_path / name / "0.png", np.full((2, 2, 2), 255), "LA")
    assert load_image_folder(tmp_path).shape == (1, 2, 2)


def test_hidden_entries_are_skipped(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "a" / ".thumbs").write_bytes(b"\0")
    assert len(load_image_folder(root)) == 2


def test_with_the_jobs_classes_a_folder_may_hold_only_some_of_them(tmp_path):
    root = _folder(tmp_path / "images", {"dog": 2})
    data = load_image_folder(root, ("cat", "dog", "eel"))
    assert data.classes == 3
    np.testing.assert_array_equal(data.y, [1, 1])


def test_load_file_and_read_file_take_an_image_folder(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 2})
    assert load_file(root, "label", ("a", "b")).shape == (1, 3, 4)
    x, labels = read_file(root, "label")
    assert x.shape == (3, 1, 3, 4)
    assert labels.tolist() == ["a", "b", "b"]


def test_the_images_task_reads_its_folder_and_needs_a_path(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    assert get_task("images").needs_path
    assert get_task("images").load(TaskConfig(name="images", path=root), 0).shape == (1, 3, 4)
    assert TaskConfig(name="images", path=root).model_dump(mode="json")["path"] == str(root)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        load_image_folder(tmp_path / "nowhere")


def test_a_folder_without_class_folders_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="no class folders"):
        load_image_folder(tmp_path)


def test_a_single_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "images", {"only": 2})
    with pytest.raises(DatasetError, match="need at least 2") as caught:
        load_image_folder(root)
    assert str(root) in str(caught.value)


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1})
    (root / "b").mkdir()
    with pytest.raises(DatasetError, match="empty class folder") as caught:
        load_image_folder(root)
    assert str(root / "b") in str(caught.value)


def test_a_file_beside_the_class_folders_is_refused(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    (root / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a folder") as caught:
        load_image_folder(root)
    assert str(root / "notes.txt") in str(caught.value)


def test_a_folder_inside_a_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    (root / "a" / "more").mkdir()
    with pytest.raises(DatasetError, match="a folder inside a class folder"):
        load_image_folder(root)


def test_a_file_that_is_not_a_png_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    (root / "b" / "scan.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(DatasetError, match="not a PNG file") as caught:
        load_image_folder(root)
    assert str(root / "b" / "scan.jpg") in str(caught.value)


def test_an_undecodable_png_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    (root / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="not a readable PNG image") as caught:
        load_image_folder(root)
    assert str(root / "b" / "broken.png") in str(caught.value)


def test_another_format_saved_as_png_is_refused(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    Image.fromarray(np.zeros((3, 4), np.uint8), "L").save(root / "b" / "x.png", format="BMP")
    with pytest.raises(DatasetError, match=r"not a PNG image \(its content is BMP\)"):
        load_image_folder(root)


def test_images_of_different_sizes_are_refused_naming_both(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    _png(root / "b" / "wide.png", np.zeros((3, 5)))
    with pytest.raises(DatasetError, match="same size and mode") as caught:
        load_image_folder(root)
    message = str(caught.value)
    assert str(root / "b" / "wide.png") in message and str(root / "a" / "0.png") in message
    assert "5x3 pixels grayscale" in message and "4x3 pixels grayscale" in message


def test_grayscale_and_rgb_images_together_are_refused(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    _png(root / "b" / "colour.png", np.zeros((3, 4, 3)), "RGB")
    with pytest.raises(DatasetError, match=r"RGB, but .* grayscale"):
        load_image_folder(root)


def test_transparent_pixels_are_refused(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    rgba = np.full((3, 4, 4), 255)
    rgba[0, 0, 3] = 0
    _png(root / "b" / "clear.png", rgba, "RGBA")
    with pytest.raises(DatasetError, match="transparent pixels"):
        load_image_folder(root)


def test_sixteen_bit_images_are_refused(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "b": 1})
    Image.fromarray(np.full((3, 4), 40_000, np.uint16)).save(root / "b" / "deep.png")
    with pytest.raises(DatasetError, match="is not supported"):
        load_image_folder(root)


def test_a_class_folder_that_is_not_one_of_the_jobs_classes_is_refused(tmp_path):
    root = _folder(tmp_path / "images", {"a": 1, "z": 1})
    with pytest.raises(DatasetError, match="not one of the job's classes"):
        load_image_folder(root, ("a", "b"))
