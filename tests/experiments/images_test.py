import numpy as np
import pytest
import tensorflow as tf

from keras_sp.experiments.data.images import ImageData
from keras_sp.experiments.data.images import find_unreadable_images
from keras_sp.experiments.data.images import image_dataset
from keras_sp.experiments.data.images import readable_images


def write_png(path, array):
    tf.io.write_file(str(path), tf.io.encode_png(np.asarray(array, np.uint8)))
    return str(path)


def write_jpeg(path, array):
    tf.io.write_file(
        str(path), tf.io.encode_jpeg(np.asarray(array, np.uint8), quality=95)
    )
    return str(path)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (4, 7, 1), dtype=np.uint8)
    rgba = rng.integers(0, 256, (3, 3, 4), dtype=np.uint8)
    smooth_gray = np.full((16, 16, 1), 90, np.uint8)
    good = {
        write_png(tmp_path / "rgb.png", rgb): rgb,
        write_png(tmp_path / "gray.png", gray): np.repeat(gray, 3, axis=-1),
        write_png(tmp_path / "rgba.png", rgba): rgba[..., :3],
        write_jpeg(tmp_path / "gray.jpg", smooth_gray): np.repeat(
            smooth_gray, 3, axis=-1
        ),
    }
    whole = tf.io.encode_jpeg(np.full((32, 32, 3), 50, np.uint8)).numpy()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    bad = [str(truncated), str(garbage), str(tmp_path / "missing.jpg")]
    return good, bad


def test_image_dataset_decodes_png_exactly_and_gray_to_three_channels(files):
    good, _ = files
    paths = list(good)
    dataset = image_dataset(paths, [3, 1, 4, 1])
    assert dataset.element_spec[0].shape.as_list() == [None, None, 3]
    assert dataset.element_spec[0].dtype == tf.uint8
    assert dataset.element_spec[1].dtype == tf.int32
    for (image, label), path, expected_label in zip(
        dataset.as_numpy_iterator(), paths, [3, 1, 4, 1], strict=True
    ):
        assert label == expected_label
        expected = good[path]
        assert image.shape == expected.shape
        if path.endswith(".png"):
            np.testing.assert_array_equal(image, expected)
        else:
            # A flat gray JPEG decodes to three equal channels near 90.
            np.testing.assert_array_equal(image[..., 0], image[..., 2])
            assert np.abs(image.astype(int) - 90).max() <= 2


def test_find_unreadable_images_names_exactly_the_bad_files(files):
    good, bad = files
    paths = [list(good)[0], bad[0], list(good)[1], bad[1], bad[2]]
    assert find_unreadable_images(paths) == bad
    assert find_unreadable_images([]) == []


def test_readable_images_skips_and_counts_or_raises(files):
    good, bad = files
    paths = list(good) + bad
    labels = list(range(len(paths)))
    kept, kept_labels, skipped = readable_images(paths, labels, "skip")
    assert kept == list(good)
    assert kept_labels == [0, 1, 2, 3]
    assert skipped == tuple(bad)
    with pytest.raises(ValueError, match="3 image file") as error:
        readable_images(paths, labels, "error")
    assert "truncated.jpg" in str(error.value)
    assert str(error.value).endswith("Received: on_corrupt='error'")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="on_corrupt='ignore'"):
        readable_images([], [], "ignore")
    with pytest.raises(ValueError, match="same length"):
        image_dataset(["a.jpg", "b.jpg"], [0])


def test_image_data_counts_classes():
    empty = image_dataset([], [])
    data = ImageData(train=empty, test=empty, class_names=("a", "b", "c"))
    assert data.num_classes == 3
    assert data.skipped == ()
