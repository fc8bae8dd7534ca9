import gzip
import struct

import numpy as np
import pytest

from keras_sp.experiments.data import class_split
from keras_sp.experiments.data import fashion_mnist
from keras_sp.experiments.data import few_shot
from keras_sp.experiments.data import load_fashion_mnist


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        struct.pack(">I", size) for size in array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(directory, train=7, test=3):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(train, 28, 28)),
        "y_train": rng.integers(0, 10, size=train),
        "x_test": rng.integers(0, 256, size=(test, 28, 28)),
        "y_test": rng.integers(0, 10, size=test),
    }
    for key, name in fashion_mnist._FILES.items():
        write_idx(directory / name, arrays[key])
    return arrays


def test_reads_the_idx_files(tmp_path):
    arrays = fake_fashion(tmp_path)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(str(tmp_path))
    np.testing.assert_array_equal(x_train, arrays["x_train"])
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(x_test, arrays["x_test"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    assert x_train.dtype == np.uint8


def test_falls_back_to_keras_datasets(tmp_path, monkeypatch):
    import keras

    sentinel = ((np.zeros((1, 28, 28)), np.zeros(1)),) * 2
    monkeypatch.setattr(
        keras.datasets.fashion_mnist, "load_data", lambda: sentinel
    )
    assert load_fashion_mnist(str(tmp_path / "empty")) is sentinel


def test_rejects_a_file_that_is_not_idx(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_mnist.read_idx(path)
    write_idx(tmp_path / "ok.gz", np.arange(6).reshape(2, 3))
    with gzip.open(tmp_path / "ok.gz") as handle:
        data = handle.read()
    with gzip.open(tmp_path / "cut.gz", "wb") as handle:
        handle.write(data[:-1])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "cut.gz")


def test_class_split_is_balanced_disjoint_and_seeded():
    labels = np.repeat(np.arange(11), 3)
    a, b = class_split(labels, seed=3)
    assert len(a) == 6 and len(b) == 5
    assert not set(a) & set(b)
    assert sorted(set(a) | set(b)) == list(range(11))
    again = class_split(labels, seed=3)
    np.testing.assert_array_equal(again[0], a)
    other = [tuple(class_split(labels, seed=s)[0]) for s in range(8)]
    assert len(set(other)) > 1


def test_class_split_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_split([4, 4, 4], seed=0)


def test_few_shot_draws_per_class_without_replacement():
    labels = np.repeat(np.arange(4), 10)
    indices = few_shot(labels, per_class=3, seed=1)
    assert len(set(indices)) == 12
    np.testing.assert_array_equal(np.bincount(labels[indices]), [3, 3, 3, 3])
    subset = few_shot(labels, per_class=2, seed=1, classes=[1, 3])
    assert set(labels[subset]) == {1, 3}


@pytest.mark.parametrize("per_class", [0, 11, 2.5, True])
def test_few_shot_bad_per_class(per_class):
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(ValueError, match="per_class"):
        few_shot(labels, per_class=per_class, seed=0)
