"""Fashion-MNIST, offline from Debian's files or through keras.datasets."""

import gzip
import os

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "load_fashion_mnist",
]

DEBIAN_DIRECTORY = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
_UBYTE = 0x08


def read_idx(path):
    """Reads an IDX file of unsigned bytes (gzipped or not) into an array.

    Args:
        path: path to a `*-idx1-ubyte` (labels) or `*-idx3-ubyte` (images)
            file, optionally ending in `.gz`.

    Returns:
        A `uint8` NumPy array with the file's dimensions.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes (its magic number "
            f"is {data[:4].hex() or 'missing'}, expected 000008xx)."
        )
    rank = data[3]
    header = 4 + 4 * rank
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)
    )
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(
            f"{path} is truncated or padded: {len(data)} bytes for shape "
            f"{shape}, expected {expected}."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(directory=None):
    """Loads Fashion-MNIST (60,000 training and 10,000 test images, 28x28).

    Reads the IDX files from `directory` (default: the environment variable
    `KERAS_SP_FASHION_MNIST`, else Debian's `dataset-fashion-mnist` package
    under `/usr/share/datasets/fashion-mnist`) when they are there, and
    otherwise calls `keras.datasets.fashion_mnist.load_data()`, which
    downloads them.

    Args:
        directory: optional folder holding the four `*-ubyte.gz` files.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `uint8` images of shape
        `(n, 28, 28)` and `uint8` labels in 0..9 (see `CLASS_NAMES`).
    """
    if directory is None:
        directory = os.environ.get("KERAS_SP_FASHION_MNIST", DEBIAN_DIRECTORY)
    paths = {key: os.path.join(directory, name) for key, name in _FILES.items()}
    if all(os.path.exists(path) for path in paths.values()):
        arrays = {key: read_idx(path) for key, path in paths.items()}
        for split in ("train", "test"):
            images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if (
                images.ndim != 3
                or labels.ndim != 1
                or (len(images) != len(labels))
            ):
                raise ValueError(
                    f"Fashion-MNIST {split} files in {directory} do not "
                    f"match: images {images.shape}, labels {labels.shape}."
                )
        return (arrays["x_train"], arrays["y_train"]), (
            arrays["x_test"],
            arrays["y_test"],
        )
    import keras

    return keras.datasets.fashion_mnist.load_data()
