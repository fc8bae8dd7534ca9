"""MIT Indoors 67 from a user-downloaded folder, with the official split."""

import os

import numpy as np

from keras_sp.experiments.data.images import ImageData
from keras_sp.experiments.data.images import image_dataset
from keras_sp.experiments.data.images import readable_images

__all__ = [
    "load_mit_indoor67",
]

IMAGES_FOLDER = "Images"
TRAIN_LIST = "TrainImages.txt"
TEST_LIST = "TestImages.txt"
_EXPECTED = (
    f"a folder holding `{TRAIN_LIST}` and `{TEST_LIST}` (the official "
    f"split, one 'category/file.jpg' per line) and the `{IMAGES_FOLDER}` "
    "folder of the MIT Indoors 67 download (one folder per category)"
)


def _read_list(path, directory):
    entries = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            entry = line.strip()
            if not entry:
                continue
            category, _, name = entry.replace("\\", "/").partition("/")
            if not category or not name:
                raise ValueError(
                    f"Line {number} of {path} is {entry!r}, expected "
                    "'category/file.jpg'. `directory` must be "
                    f"{_EXPECTED}. Received: directory={directory!r}"
                )
            entries.append((category, f"{category}/{name}"))
    if not entries:
        raise ValueError(
            f"{path} lists no image. `directory` must be {_EXPECTED}. "
            f"Received: directory={directory!r}"
        )
    return entries


def load_mit_indoor67(directory, seed=0, on_corrupt="error"):
    """MIT Indoors 67 with the official training and test lists.

    The official split has 80 training and 20 test images per category
    (5,360 and 1,340 images; the paper's Table 1). Class names are the
    categories of `TrainImages.txt`, sorted; labels index them. The
    training images come in a random order fixed by `seed` (so that a
    shuffle buffer mixes the classes), the test images in list order.

    Args:
        directory: the folder holding `TrainImages.txt`, `TestImages.txt`
            and `Images/<category>/<file>`.
        seed: int, the seed of the order of the training images.
        on_corrupt: `"error"` (default) raises a `ValueError` naming the
            listed image files that are missing or cannot be decoded;
            `"skip"` leaves them out and lists them in `ImageData.skipped`.

    Returns:
        An `ImageData` with `train`, `test`, `class_names` and `skipped`.

    Example:

    >>> load_mit_indoor67("/no/such/folder")
    Traceback (most recent call last):
    ...
    ValueError: `directory` must be a folder holding `TrainImages.txt` ...

    Reference:
        Quattoni, Torralba. "Recognizing indoor scenes." CVPR 2009.
        Li, Grandvalet, Davoine. "Explicit inductive bias for transfer
        learning with convolutional networks." ICML 2018, section 4.1.
    """
    directory = os.fspath(directory)
    expected = (TRAIN_LIST, TEST_LIST, IMAGES_FOLDER)
    missing = [
        name
        for name in expected
        if not os.path.exists(os.path.join(directory, name))
    ]
    if missing:
        raise ValueError(
            f"`directory` must be {_EXPECTED}; missing: "
            f"{', '.join(missing)}. Received: directory={directory!r}"
        )
    images = os.path.join(directory, IMAGES_FOLDER)
    train = _read_list(os.path.join(directory, TRAIN_LIST), directory)
    test = _read_list(os.path.join(directory, TEST_LIST), directory)
    class_names = tuple(sorted({category for category, _ in train}))
    unknown = sorted({c for c, _ in test} - set(class_names))
    if unknown:
        raise ValueError(
            f"{TEST_LIST} names categories absent from {TRAIN_LIST}: "
            f"{unknown[:5]}. Received: directory={directory!r}"
        )
    label_of = {name: label for label, name in enumerate(class_names)}
    splits = {}
    skipped = ()
    for split, entries in (("train", train), ("test", test)):
        paths = [os.path.join(images, *e.split("/")) for _, e in entries]
        labels = [label_of[category] for category, _ in entries]
        paths, labels, unreadable = readable_images(paths, labels, on_corrupt)
        if split == "train":
            order = np.random.default_rng(seed).permutation(len(paths))
            paths = [paths[i] for i in order]
            labels = [labels[i] for i in order]
        splits[split] = image_dataset(paths, labels)
        skipped += unreadable
    return ImageData(
        train=splits["train"],
        test=splits["test"],
        class_names=class_names,
        skipped=skipped,
    )
