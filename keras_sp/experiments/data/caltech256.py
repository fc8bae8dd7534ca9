"""Caltech-256 from a user-downloaded `256_ObjectCategories` folder."""

import os
import re

import numpy as np

from keras_sp.experiments.data.images import IMAGE_EXTENSIONS
from keras_sp.experiments.data.images import ImageData
from keras_sp.experiments.data.images import image_dataset
from keras_sp.experiments.data.images import readable_images
from keras_sp.experiments.data.splits import few_shot

__all__ = [
    "load_caltech256",
]

FOLDER_NAME = "256_ObjectCategories"
CLUTTER = "clutter"
_CATEGORY = re.compile(r"^(\d{3})\.(.+)$")
_EXPECTED = (
    f"the `{FOLDER_NAME}` folder of Caltech-256, holding one folder per "
    "category named like '001.ak47', '002.american-flag', ..., "
    "'257.clutter'"
)


def _category_folders(directory):
    """`[(number, name, path)]` of the category folders, sorted by number."""
    if not os.path.isdir(directory):
        raise ValueError(
            f"`directory` must be {_EXPECTED}; it does not exist or is not "
            f"a folder. Received: directory={directory!r}"
        )
    nested = os.path.join(directory, FOLDER_NAME)
    if os.path.isdir(nested):
        directory = nested
    folders = sorted(
        entry
        for entry in os.listdir(directory)
        if not entry.startswith(".")
        and os.path.isdir(os.path.join(directory, entry))
    )
    unexpected = [entry for entry in folders if not _CATEGORY.match(entry)]
    if not folders or unexpected:
        found = ", ".join(repr(name) for name in unexpected[:5]) or "none"
        raise ValueError(
            f"`directory` must be {_EXPECTED}. Found folders not named that "
            f"way: {found}. Received: directory={directory!r}"
        )
    categories = []
    for entry in folders:
        number, name = _CATEGORY.match(entry).groups()
        categories.append((int(number), name, os.path.join(directory, entry)))
    categories.sort()
    numbers = [number for number, _, _ in categories]
    if numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        raise ValueError(
            f"`directory` must be {_EXPECTED}, numbered 1, 2, ... without "
            f"gaps or repeats. Category numbers found: missing {missing}, "
            f"{len(numbers) - len(set(numbers))} repeated. Received: "
            f"directory={directory!r}"
        )
    return categories


def load_caltech256(
    directory,
    per_class=30,
    seed=0,
    include_clutter=True,
    on_corrupt="error",
):
    """Caltech-256 with `per_class` random training images per category.

    As in the paper (Table 1, 257 classes), `per_class` images (30 or 60)
    are drawn at random from each category for training and all the
    remaining images of the category are the test set; the draw depends only
    on `seed`. The 257th category, `257.clutter`, is a class like the others
    unless `include_clutter=False`. Only image files directly inside a
    category folder are read: sub-folders (such as the duplicate images in
    `056.dog/greg`) and other files are ignored. Labels follow the category
    numbers: `001.ak47` is label 0. The training images come in a random
    order fixed by `seed` (so that a shuffle buffer mixes the classes), the
    test images in file order.

    Args:
        directory: the `256_ObjectCategories` folder (or the folder holding
            it) of the Caltech-256 download.
        per_class: training images drawn per category (paper: 30 or 60).
        seed: int, the seed of the random draw and of the training order.
        include_clutter: whether `257.clutter` is a class (paper: yes).
        on_corrupt: `"error"` (default) raises a `ValueError` naming the
            image files that cannot be decoded; `"skip"` leaves them out
            and lists them in `ImageData.skipped`.

    Returns:
        An `ImageData` with `train`, `test`, `class_names` (the category
        names without their numbers, e.g. `"ak47"`) and `skipped`.

    Example:

    >>> load_caltech256("/no/such/folder")
    Traceback (most recent call last):
    ...
    ValueError: `directory` must be the `256_ObjectCategories` folder ...

    Reference:
        Griffin, Holub, Perona. "Caltech-256 object category dataset."
        Caltech technical report 7694, 2007. Li, Grandvalet, Davoine.
        "Explicit inductive bias for transfer learning with convolutional
        networks." ICML 2018, section 4.1.
    """
    if (
        isinstance(per_class, bool)
        or not isinstance(per_class, (int, np.integer))
        or per_class < 1
    ):
        raise ValueError(
            "`per_class` must be a positive integer (the paper uses 30 or "
            f"60). Received: per_class={per_class!r}"
        )
    categories = _category_folders(os.fspath(directory))
    if not include_clutter:
        categories = [c for c in categories if c[1] != CLUTTER]
    paths, labels = [], []
    for label, (_, _, folder) in enumerate(categories):
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(
                path
            ):
                paths.append(path)
                labels.append(label)
    paths, labels, skipped = readable_images(paths, labels, on_corrupt)
    labels = np.asarray(labels, dtype="int32")
    counts = np.bincount(labels, minlength=len(categories))
    for (number, name, _), count in zip(categories, counts, strict=True):
        if count <= per_class:
            raise ValueError(
                f"Category {number:03d}.{name} has {count} readable images; "
                f"drawing per_class={per_class} for training would leave no "
                f"test image. Received: per_class={per_class!r}"
            )
    train = few_shot(labels, per_class, seed)
    test = np.setdiff1d(np.arange(len(labels)), train)
    train = np.random.default_rng(seed).permutation(train)
    paths = np.asarray(paths)
    return ImageData(
        train=image_dataset(paths[train], labels[train]),
        test=image_dataset(paths[test], labels[test]),
        class_names=tuple(name for _, name, _ in categories),
        skipped=skipped,
    )
