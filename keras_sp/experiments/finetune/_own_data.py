"""The user's own target data: an image folder, an `.npz` file, a tfds set.

`load_target` is the stage's loader: it reads an own target (see
`_own_spec`) as an `ImageData` and returns it as an `ImageTarget` (the
paper's pre-processing: resize to `image_size`, random crops, mirrors and
blur for training, the central crop for testing, minus the channel mean of
the training images, or the MobileNet scaling); a paper target goes to
`_targets.load_target`. Every image is resized, so images of different
sizes (in a folder, or between `x_train` and `x_test`) are accepted; gray
images are duplicated to three channels.

Bad data raise a `ConfigError` naming the config key and the value.
"""

import os
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sp.experiments import data as datasets
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.data.images import IMAGE_EXTENSIONS
from keras_sp.experiments.data.images import ImageData
from keras_sp.experiments.data.images import image_dataset
from keras_sp.experiments.data.images import readable_images
from keras_sp.experiments.finetune import _targets
from keras_sp.experiments.finetune._own_spec import is_own_target
from keras_sp.experiments.finetune._own_spec import source_of

__all__ = [
    "load_own_data",
    "load_target",
]


def load_target(settings, images, channels, per_class):
    """The target task of one data set: an own target, or a paper target.

    Args:
        settings: a `TargetSettings`.
        images: an `ImageSettings`.
        channels: the channels the backbone takes.
        per_class: training images per class (None: all of them).

    Returns:
        An `ImageTarget` (own data) or what `_targets.load_target` returns.
    """
    if not is_own_target(settings.target):
        return _targets.load_target(settings, images, channels, per_class)
    if channels != 3:
        raise ConfigError(
            "Config key 'backbone' must take 3-channel images for an own "
            "target (its images are given in RGB). Received: a backbone "
            f"taking {channels} channel(s)"
        )
    data = load_own_data(
        settings.target, per_class, settings.seed, settings.on_corrupt
    )
    return _targets.ImageTarget(data, images)


def load_own_data(target, per_class, seed, on_corrupt="error"):
    """An own target as an `ImageData` with `per_class` training images.

    Args:
        target: the config's `target` object (checked by `_own_spec`).
        per_class: training images drawn per class (None: all).
        seed: the seed of the draw (and of a folder's test split).
        on_corrupt: `"error"` or `"skip"` for unreadable image files.

    Returns:
        An `ImageData`.
    """
    loader = {"folder": _folder, "npz": _npz, "tfds": _tfds}
    return loader[source_of(target)](target, per_class, seed, on_corrupt)


def _draw(labels, class_names, per_class, seed, where):
    """`per_class` training indices per class (all with None), in an order
    fixed by `seed`; every class must have enough images."""
    counts = np.bincount(labels, minlength=len(class_names))
    need = 2 if per_class is None else per_class
    for name, count in zip(class_names, counts, strict=True):
        if count < need:
            if per_class is None:
                raise ConfigError(
                    f"Class {name!r} of {where} has {count} training "
                    "image(s); at least 2 are needed (one to train on, one "
                    "held out to validate). Received: per_class=None"
                )
            raise ConfigError(
                f"Config key 'per_class': class {name!r} of {where} has "
                f"{count} training image(s), fewer than per_class="
                f"{per_class}. Received: per_class={per_class!r}"
            )
    if per_class is None:
        chosen = np.arange(len(labels))
    else:
        chosen = datasets.few_shot(labels, per_class, seed)
    return np.random.default_rng(seed).permutation(chosen)


# The image folder.


def _subfolders(folder):
    return sorted(
        entry
        for entry in os.listdir(folder)
        if not entry.startswith(".")
        and os.path.isdir(os.path.join(folder, entry))
    )


def _class_images(folder, key, value):
    """`(class_names, paths, labels)` of a folder of class folders."""
    names = _subfolders(folder)
    if not names:
        raise ConfigError(
            f"Config key '{key}' must be a folder of class folders "
            f"(<class name>/<image>); {folder!r} holds none. Received: "
            f"{key}={value!r}"
        )
    paths, labels = [], []
    for label, name in enumerate(names):
        class_folder = os.path.join(folder, name)
        files = [
            os.path.join(class_folder, entry)
            for entry in sorted(os.listdir(class_folder))
            if entry.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.isfile(os.path.join(class_folder, entry))
        ]
        if not files:
            raise ConfigError(
                f"Config key '{key}': the class folder {class_folder!r} "
                f"holds no image file ({', '.join(IMAGE_EXTENSIONS)}). "
                f"Received: {key}={value!r}"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    return names, paths, labels


def _readable(paths, labels, on_corrupt, value):
    try:
        return readable_images(paths, labels, on_corrupt)
    except ValueError as error:
        raise ConfigError(
            f"Config key 'target.folder': {error} (config key 'on_corrupt'"
            f"). Received: target.folder={value!r}"
        ) from None


def _test_split(labels, class_names, fraction, seed, value):
    """Stratified: `fraction` of each class (at least one) is test."""
    rng = np.random.default_rng(seed + 20_000)
    train, test = [], []
    for label, name in enumerate(class_names):
        members = rng.permutation(np.flatnonzero(labels == label))
        held = max(1, round(fraction * len(members)))
        if held >= len(members):
            raise ConfigError(
                f"Config key 'target.test_fraction' leaves no training "
                f"image in class {name!r} of {value!r} ({len(members)} "
                f"image(s)). Received: target.test_fraction={fraction!r}"
            )
        test.extend(members[:held])
        train.extend(members[held:])
    return np.sort(np.asarray(train, int)), np.sort(np.asarray(test, int))


def _folder(target, per_class, seed, on_corrupt):
    value = target["folder"]
    root = os.path.expanduser(value)
    present = [part for part in ("train", "test") if part in _subfolders(root)]
    if len(present) == 2:
        names, paths, labels = _class_images(
            os.path.join(root, "train"), "target.folder", value
        )
        test_names, test_paths, test_labels = _class_images(
            os.path.join(root, "test"), "target.folder", value
        )
        unknown = [name for name in test_names if name not in names]
        if unknown:
            raise ConfigError(
                f"Config key 'target.folder': the test class folder "
                f"{unknown[0]!r} has no training folder in "
                f"{os.path.join(value, 'train')!r}. Received: "
                f"target.folder={value!r}"
            )
        test_labels = [names.index(test_names[y]) for y in test_labels]
        paths, labels, skipped = _readable(paths, labels, on_corrupt, value)
        test_paths, test_labels, test_skipped = _readable(
            test_paths, test_labels, on_corrupt, value
        )
        skipped += test_skipped
        labels = np.asarray(labels, dtype="int32")
        train_paths = np.asarray(paths)
    else:
        if present:
            raise ConfigError(
                f"Config key 'target.folder' holds a {present[0]!r} folder "
                "but no "
                f"{'test' if present[0] == 'train' else 'train'!r} folder: "
                "give both (train/<class>, test/<class>) or class folders "
                f"only. Received: target.folder={value!r}"
            )
        names, paths, labels = _class_images(root, "target.folder", value)
        paths, labels, skipped = _readable(paths, labels, on_corrupt, value)
        labels = np.asarray(labels, dtype="int32")
        train, test = _test_split(
            labels, names, target.get("test_fraction", 0.2), seed, value
        )
        all_paths = np.asarray(paths)
        train_paths, test_paths = all_paths[train], all_paths[test]
        test_labels, labels = labels[test], labels[train]
    draw = _draw(labels, names, per_class, seed, repr(value))
    return ImageData(
        train=image_dataset(train_paths[draw], labels[draw]),
        test=image_dataset(list(test_paths), test_labels),
        class_names=tuple(names),
        skipped=tuple(skipped),
    )


# The .npz file.

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_images(x, name, value):
    where = f"Config key 'target.npz': array {name!r} of {value!r}"
    if x.dtype == object:
        raise ConfigError(
            f"{where} holds images of mismatched sizes (an object array); "
            "every image of an array must have the same height and width "
            "(they are then resized to image_size). Received: "
            f"target.npz={value!r}"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or 0 in x.shape[1:]:
        raise ConfigError(
            f"{where} must hold images of shape (N, H, W) or (N, H, W, C) "
            f"with C 1 or 3. Received: shape {x.shape}"
        )
    if x.dtype == np.uint8:
        images = x
    elif np.issubdtype(x.dtype, np.floating):
        images = x.astype("float32")
        if not np.all(np.isfinite(images)):
            raise ConfigError(
                f"{where} holds NaN or infinite values. Received: "
                f"target.npz={value!r}"
            )
        if images.size and images.max() <= 1.0:
            images = images * 255.0
    else:
        raise ConfigError(
            f"{where} must be uint8 or float images. Received: dtype {x.dtype}"
        )
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _npz_labels(y, count, name, value):
    where = f"Config key 'target.npz': array {name!r} of {value!r}"
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != count:
        raise ConfigError(
            f"{where} must hold one integer label per image ({count}). "
            f"Received: shape {y.shape}"
        )
    if y.dtype.kind not in "iuf":
        raise ConfigError(
            f"{where} must hold integer labels. Received: dtype {y.dtype}"
        )
    whole = np.isfinite(y) & (np.round(y) == y) if y.dtype.kind == "f" else None
    if whole is not None and not whole.all():
        bad = int(np.flatnonzero(~whole)[0])
        raise ConfigError(
            f"{where} must hold integer labels. Received: {name}[{bad}]="
            f"{y[bad].item()!r}"
        )
    if np.any(y < 0):
        bad = int(np.flatnonzero(y < 0)[0])
        raise ConfigError(
            f"{where} must hold labels 0 .. C-1. Received: {name}[{bad}]="
            f"{y[bad].item()!r}"
        )
    return y.astype("int64")


def _npz(target, per_class, seed, on_corrupt):
    del on_corrupt  # no image file to read
    value = target["npz"]
    try:
        with np.load(os.path.expanduser(value), allow_pickle=False) as file:
            missing = [key for key in _NPZ_KEYS if key not in file.files]
            if missing:
                raise ConfigError(
                    f"Config key 'target.npz': {value!r} has no array "
                    f"{missing[0]!r} (it needs {list(_NPZ_KEYS)}; it has "
                    f"{sorted(file.files)}). Received: target.npz={value!r}"
                )
            arrays = {key: file[key] for key in _NPZ_KEYS}
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise ConfigError(
                f"Config key 'target.npz': cannot read {value!r} ({error})."
                f" Received: target.npz={value!r}"
            ) from None
        raise ConfigError(
            f"Config key 'target.npz': {value!r} holds an object array "
            "(images of mismatched sizes?); every array must be numeric, "
            "its images of one size (they are then resized to image_size)."
            f" Received: target.npz={value!r}"
        ) from None
    except (OSError, zipfile.BadZipFile) as error:
        raise ConfigError(
            f"Config key 'target.npz': cannot read {value!r} ({error}). "
            f"Received: target.npz={value!r}"
        ) from None
    x_train = _npz_images(arrays["x_train"], "x_train", value)
    x_test = _npz_images(arrays["x_test"], "x_test", value)
    y_train = _npz_labels(arrays["y_train"], len(x_train), "y_train", value)
    y_test = _npz_labels(arrays["y_test"], len(x_test), "y_test", value)
    num_classes = int(y_train.max()) + 1 if len(y_train) else 0
    if len(y_test) and y_test.max() >= num_classes:
        bad = int(np.argmax(y_test >= num_classes))
        raise ConfigError(
            f"Config key 'target.npz': array 'y_test' of {value!r} holds a "
            f"label out of range: the classes of y_train are 0 .. "
            f"{num_classes - 1}. Received: y_test[{bad}]={int(y_test[bad])}"
        )
    names = tuple(str(label) for label in range(num_classes))
    draw = _draw(y_train, names, per_class, seed, repr(value))

    def pairs(x, y):
        return tf.data.Dataset.from_tensor_slices((x, y.astype("int32")))

    return ImageData(
        train=pairs(x_train[draw], y_train[draw]),
        test=pairs(x_test, y_test),
        class_names=names,
    )


# The tfds data set.


def _tfds(target, per_class, seed, on_corrupt):
    del on_corrupt  # tfds decodes its own records
    name = target["tfds"]
    splits = [target.get("train_split", "train")]
    splits.append(target.get("test_split", "test"))
    data_dir = target.get("data_dir")
    image_key = target.get("image_key", "image")
    label_key = target.get("label_key", "label")
    try:
        (train, test), info = tfds.load(
            name,
            split=splits,
            data_dir=None if data_dir is None else os.path.expanduser(data_dir),
            download=False,
            with_info=True,
        )
    except (ValueError, AssertionError, OSError, KeyError) as error:
        raise ConfigError(
            f"Config key 'target.tfds': cannot load the prepared tfds data "
            f"set {name!r}, splits {splits}, from data_dir={data_dir!r} "
            f"(nothing is downloaded): {error}. Received: "
            f"target.tfds={name!r}"
        ) from None
    for key, option in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in info.features:
            raise ConfigError(
                f"Config key 'target.{option}' is not a feature of "
                f"{name!r} (features: {sorted(info.features)}). Received: "
                f"target.{option}={key!r}"
            )
    names = getattr(info.features[label_key], "names", None)
    if not names:
        raise ConfigError(
            f"Config key 'target.label_key' must be a ClassLabel feature of "
            f"{name!r}. Received: target.label_key={label_key!r}"
        )

    def pair(example):
        image = example[image_key]
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image, tf.cast(example[label_key], tf.int32)

    # The labels of the draw, read without decoding the images.
    undecoded = tfds.load(
        name,
        split=splits[0],
        data_dir=None if data_dir is None else os.path.expanduser(data_dir),
        download=False,
        decoders={image_key: tfds.decode.SkipDecoding()},
    )
    labels = np.array(
        [
            int(y)
            for y in undecoded.map(lambda e: e[label_key]).as_numpy_iterator()
        ],
        dtype="int64",
    )
    draw = _draw(labels, tuple(names), per_class, seed, repr(name))
    keep = np.zeros(len(labels), dtype=bool)
    keep[draw] = True
    keep = tf.constant(keep)
    chosen = (
        train.enumerate()
        .filter(lambda i, example: tf.gather(keep, i))
        .map(lambda i, example: example)
    )
    return ImageData(
        train=chosen.map(pair, num_parallel_calls=tf.data.AUTOTUNE),
        test=test.map(pair, num_parallel_calls=tf.data.AUTOTUNE),
        class_names=tuple(names),
    )
