import numpy as np
import pytest
import tensorflow as tf

from keras_sp.experiments.data import load_mit_indoor67

# category -> (training files, test files), as the official lists name them.
SPLIT = {
    "kitchen": (["int474.jpg", "k1.png", "k2.png"], ["k3.png"]),
    "bar": (["b1.png", "b2.jpg"], ["b3.png", "b4.png"]),
    "gameroom": (["g1.png", "g2.png"], ["g3.png"]),
}


def write_tree(root):
    """Images/<category>/<file> and the two official lists (CRLF ends)."""
    values, value = {}, 20
    for category, (train, test) in SPLIT.items():
        folder = root / "Images" / category
        folder.mkdir(parents=True)
        for name in train + test:
            image = np.full((6, 8, 3), value, np.uint8)
            encode = (
                tf.io.encode_png
                if name.endswith(".png")
                else (lambda x: tf.io.encode_jpeg(x, quality=100))
            )
            tf.io.write_file(str(folder / name), encode(image))
            values[f"{category}/{name}"] = value
            value += 9
        # An image not in either list is not read.
        tf.io.write_file(
            str(folder / "unlisted.png"),
            tf.io.encode_png(np.full((2, 2, 3), 255, np.uint8)),
        )
    for list_name, part in (("TrainImages.txt", 0), ("TestImages.txt", 1)):
        lines = [f"{c}/{n}" for c, files in SPLIT.items() for n in files[part]]
        (root / list_name).write_bytes(
            ("\r\n".join(lines) + "\r\n\r\n").encode()
        )
    return values


def read_values(dataset):
    return sorted(
        (int(np.round(image.mean())), int(label))
        for image, label in dataset.as_numpy_iterator()
    )


def test_official_lists_give_the_split_and_sorted_classes(tmp_path):
    values = write_tree(tmp_path)
    data = load_mit_indoor67(tmp_path)
    assert data.class_names == ("bar", "gameroom", "kitchen")
    label = {name: i for i, name in enumerate(data.class_names)}
    for dataset, part in ((data.train, 0), (data.test, 1)):
        expected = sorted(
            (values[f"{c}/{n}"], label[c])
            for c, files in SPLIT.items()
            for n in files[part]
        )
        assert read_values(dataset) == expected
    assert data.skipped == ()
    order = [int(y) for _, y in data.train.as_numpy_iterator()]
    assert order != sorted(order) and order != sorted(order, reverse=True)
    again = load_mit_indoor67(tmp_path, seed=0).train.as_numpy_iterator()
    assert [int(y) for _, y in again] == order


def test_missing_or_corrupt_listed_images_raise_or_are_skipped(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "Images" / "bar" / "b3.png").unlink()
    (tmp_path / "Images" / "kitchen" / "k1.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="k1.png"):
        load_mit_indoor67(tmp_path)
    data = load_mit_indoor67(tmp_path, on_corrupt="skip")
    assert [p.replace("\\", "/").split("Images/")[1] for p in data.skipped] == [
        "kitchen/k1.png",
        "bar/b3.png",
    ]
    assert len(read_values(data.train)) == 6
    assert len(read_values(data.test)) == 3


def test_unexpected_layouts_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="TrainImages.txt") as error:
        load_mit_indoor67(tmp_path / "nowhere")
    assert str(error.value).endswith(f"directory={str(tmp_path / 'nowhere')!r}")
    write_tree(tmp_path)
    (tmp_path / "TestImages.txt").unlink()
    with pytest.raises(ValueError, match="missing: TestImages.txt"):
        load_mit_indoor67(tmp_path)
    (tmp_path / "TestImages.txt").write_text("bar/b3.png\nlibrary/l1.png\n")
    with pytest.raises(ValueError, match="library"):
        load_mit_indoor67(tmp_path)
    (tmp_path / "TestImages.txt").write_text("bar/b3.png\njust-a-name.png\n")
    with pytest.raises(ValueError, match="Line 2 .* 'category/file.jpg'"):
        load_mit_indoor67(tmp_path)
