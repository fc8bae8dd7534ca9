import os

import numpy as np
import pytest
import tensorflow as tf

from keras_sp.experiments.data import load_caltech256

CATEGORIES = ("ak47", "american-flag", "backpack", "clutter")
IMAGES_PER_CATEGORY = (5, 6, 5, 7)


def image_id(category, index):
    """A unique value per image, written into every pixel's red channel."""
    return 10 + 20 * category + 3 * index


def write_tree(root):
    """A small `256_ObjectCategories` tree; returns {id: category}."""
    folder = root / "256_ObjectCategories"
    ids = {}
    for category, (name, count) in enumerate(
        zip(CATEGORIES, IMAGES_PER_CATEGORY, strict=True)
    ):
        directory = folder / f"{category + 1:03d}.{name}"
        directory.mkdir(parents=True)
        for index in range(count):
            value = image_id(category, index)
            ids[value] = category
            image = np.zeros((9, 7, 3), np.uint8)
            image[..., 0] = value
            image[..., 1] = 255 - value
            stem = directory / f"{category + 1:03d}_{index + 1:04d}"
            if index == 0:
                # A gray JPEG, as some Caltech-256 images are.
                gray = np.full((9, 7, 1), value, np.uint8)
                data = tf.io.encode_jpeg(gray, quality=100)
                tf.io.write_file(f"{stem}.jpg", data)
            else:
                tf.io.write_file(f"{stem}.png", tf.io.encode_png(image))
        (directory / "notes.txt").write_text("not an image")
        (directory / ".DS_Store").write_bytes(b"\0\1")
    extra = folder / "001.ak47" / "greg"
    extra.mkdir()
    tf.io.write_file(
        str(extra / "copy.png"),
        tf.io.encode_png(np.full((4, 4, 3), 250, np.uint8)),
    )
    return folder, ids


def read_ids(dataset):
    """`[(image id, label)]`, ids read back from the red channel."""
    pairs = []
    for image, label in dataset.as_numpy_iterator():
        assert image.ndim == 3 and image.shape[-1] == 3
        pairs.append((int(np.round(np.median(image[..., 0]))), int(label)))
    return pairs


def test_training_draw_has_per_class_images_and_rest_is_test(tmp_path):
    folder, ids = write_tree(tmp_path)
    data = load_caltech256(folder, per_class=3, seed=0)
    assert data.class_names == CATEGORIES
    assert data.num_classes == 4 and data.skipped == ()
    train, test = read_ids(data.train), read_ids(data.test)
    # Every image keeps the label of its category folder.
    for value, label in train + test:
        assert ids[value] == label
    assert np.bincount([y for _, y in train]).tolist() == [3, 3, 3, 3]
    assert np.bincount([y for _, y in test]).tolist() == [
        n - 3 for n in IMAGES_PER_CATEGORY
    ]
    train_ids = {value for value, _ in train}
    test_ids = {value for value, _ in test}
    assert not train_ids & test_ids
    # Sub-folders and non-image files are ignored.
    assert train_ids | test_ids == set(ids)


def test_draw_depends_only_on_the_seed(tmp_path):
    folder, _ = write_tree(tmp_path)
    first = read_ids(load_caltech256(folder, per_class=2, seed=7).train)
    again = read_ids(load_caltech256(folder, per_class=2, seed=7).train)
    other = read_ids(load_caltech256(folder, per_class=2, seed=8).train)
    assert first == again
    assert set(first) != set(other)
    # The training order mixes the classes; the test order is the files'.
    labels = [label for _, label in first]
    assert labels != sorted(labels)
    test = read_ids(load_caltech256(folder, per_class=2, seed=7).test)
    assert test == sorted(test)


def test_parent_folder_and_clutter_option(tmp_path):
    folder, ids = write_tree(tmp_path)
    data = load_caltech256(tmp_path, per_class=2, include_clutter=False)
    assert data.class_names == CATEGORIES[:3]
    values = {v for v, _ in read_ids(data.train) + read_ids(data.test)}
    assert values == {v for v, c in ids.items() if c < 3}


def test_corrupt_images_raise_or_are_skipped_and_counted(tmp_path):
    folder, ids = write_tree(tmp_path)
    broken = folder / "002.american-flag" / "002_0099.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match="002_0099.jpg"):
        load_caltech256(folder, per_class=2)
    data = load_caltech256(folder, per_class=2, on_corrupt="skip")
    assert data.skipped == (str(broken),)
    pairs = read_ids(data.train) + read_ids(data.test)
    assert len(pairs) == len(ids)


def test_unexpected_layouts_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as error:
        load_caltech256(tmp_path / "nowhere")
    assert "'001.ak47'" in str(error.value)
    assert str(error.value).endswith(f"directory={str(tmp_path / 'nowhere')!r}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="256_ObjectCategories"):
        load_caltech256(empty)
    folder, _ = write_tree(tmp_path / "tree")
    (folder / "misc").mkdir()
    with pytest.raises(ValueError, match="'misc'"):
        load_caltech256(folder)
    os.rmdir(folder / "misc")
    os.rename(folder / "003.backpack", folder / "005.backpack")
    with pytest.raises(ValueError, match=r"missing \[3\]"):
        load_caltech256(folder)


def test_bad_per_class_is_named(tmp_path):
    folder, _ = write_tree(tmp_path)
    with pytest.raises(ValueError, match="001.ak47 has 5 readable images"):
        load_caltech256(folder, per_class=5)
    with pytest.raises(ValueError, match="per_class=0"):
        load_caltech256(folder, per_class=0)
