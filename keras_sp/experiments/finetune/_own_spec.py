"""The `target` of a config that names the user's own data, and its checks.

Besides the paper's target names, the config key `target` takes an object
naming one source of images, with its options:

- `{"folder": PATH}`: a folder in the layout of
  `keras.utils.image_dataset_from_directory`, `PATH/<class name>/<image>`
  (JPEG, PNG, GIF or BMP), classes in the sorted order of their folder
  names. With `PATH/train/<class name>/...` and `PATH/test/<class name>/...`
  these are the training and test images; otherwise `"test_fraction"`
  (default 0.2) of each class's images, drawn with the config's `seed`,
  are the test images.
- `{"npz": PATH}`: a NumPy `.npz` file holding the arrays `x_train`,
  `y_train`, `x_test` and `y_test`: images `(N, H, W)` or `(N, H, W, C)`
  (C = 1 or 3), `uint8` or float (taken as 0-255 values, or as 0-1 values
  scaled by 255 when no value exceeds 1), and integer labels `0 .. C-1`.
- `{"tfds": NAME}`: a TensorFlow Datasets data set already prepared in
  `"data_dir"` (default: tfds's folder; nothing is downloaded), its
  `"train_split"` (default `"train"`) and `"test_split"` (default
  `"test"`), the features `"image_key"` (default `"image"`) and
  `"label_key"` (default `"label"`, a `ClassLabel`).

Each also takes `"name"`, the data set's name in the run records and
tables (default: the folder's or file's name, or the tfds name).
"""

import os
import re

from keras_sp.experiments.config import ConfigError

__all__ = [
    "SOURCES",
    "check_target",
    "is_own_target",
    "source_of",
    "target_name",
]

# The key naming the source of the images, and the options each takes.
SOURCES = {
    "folder": ("test_fraction",),
    "npz": (),
    "tfds": ("train_split", "test_split", "data_dir", "image_key", "label_key"),
}
_STRINGS = ("folder", "npz", "tfds", "train_split", "test_split", "image_key")
_STRINGS += ("label_key", "name")


def is_own_target(target):
    """Whether a config's `target` names the user's own data (an object)."""
    return isinstance(target, dict)


def source_of(target):
    """`"folder"`, `"npz"` or `"tfds"`: the source key of a checked target."""
    return next(key for key in SOURCES if key in target)


def check_target(target):
    """Raises `ConfigError` naming the first bad key of an own `target`."""
    given = [key for key in SOURCES if key in target]
    if len(given) != 1:
        raise ConfigError(
            "Config key 'target' must name exactly one of "
            f"{list(SOURCES)} (e.g. {{'folder': PATH}}). "
            f"Received: target={target!r}"
        )
    source = given[0]
    allowed = (source, "name") + SOURCES[source]
    for key, value in target.items():
        if key not in allowed:
            raise ConfigError(
                f"Config key 'target.{key}' is not an option of a "
                f"{source!r} target (allowed: {list(allowed)}). Received: "
                f"target.{key}={value!r}"
            )
        if key in _STRINGS and not (isinstance(value, str) and value):
            raise ConfigError(
                f"Config key 'target.{key}' must be a non-empty string. "
                f"Received: target.{key}={value!r}"
            )
    data_dir = target.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise ConfigError(
            "Config key 'target.data_dir' must be a folder or null. "
            f"Received: target.data_dir={data_dir!r}"
        )
    fraction = target.get("test_fraction", 0.2)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction < 1
    ):
        raise ConfigError(
            "Config key 'target.test_fraction' must be between 0 and 1. "
            f"Received: target.test_fraction={fraction!r}"
        )
    if source in ("folder", "npz"):
        path = target[source]
        exists = os.path.isdir if source == "folder" else os.path.isfile
        if not exists(os.path.expanduser(path)):
            what = "folder" if source == "folder" else ".npz file"
            raise ConfigError(
                f"Config key 'target.{source}' must be an existing {what}; "
                f"there is none there. Received: target.{source}={path!r}"
            )


def target_name(target):
    """The name of a target in the run records (`"flowers"`).

    A paper target is its own name; an own target its `"name"`, or the base
    name of its folder or file (without `.npz`), or its tfds name, with
    characters other than letters, digits, `-` and `_` replaced by `_`.
    """
    if not is_own_target(target):
        return target
    if "name" in target:
        name = target["name"]
    elif "tfds" in target:
        name = target["tfds"]
    else:
        path = os.path.normpath(target.get("folder") or target.get("npz"))
        name = os.path.basename(path)
        if name.endswith(".npz"):
            name = name[: -len(".npz")]
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(name)) or "target"
