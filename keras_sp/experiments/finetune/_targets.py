"""The data of fine-tuning: the target task's two pipelines, source images.

A target task is held by `ArrayTarget` (images in memory: Fashion-MNIST)
or `ImageTarget` (an `ImageData` of image files or tfds: Caltech-256, MIT
Indoors 67, Stanford Dogs). Both give training batches (random crops and
mirrors) and test-time batches (the central crop) of the training images a
run uses, and of the test images. `SourceData` gives the source task's
images through the target's test-time pre-processing, which the fine-tuned
network expects.
"""

import dataclasses
import hashlib
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from keras_sp.experiments import data as datasets
from keras_sp.experiments import fashion_source
from keras_sp.experiments.config import ConfigError

__all__ = [
    "ArrayTarget",
    "DataSet",
    "ImageSettings",
    "ImageTarget",
    "SourceData",
    "SourceImages",
    "SourceSettings",
    "TargetSettings",
    "load_target",
    "materialize",
    "validation_split",
]

# The paper resizes to 256 and crops 224: the crop keeps 224/256 of a side.
_CROP_RATIO = 256 / 224


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """The config keys that say how images become network inputs."""

    input_size: int
    image_size: int | None
    preprocessing: str
    color_order: str
    batch_size: int

    @property
    def resized_size(self):
        """The side images are resized to before cropping."""
        if self.image_size is not None:
            return self.image_size
        return round(self.input_size * _CROP_RATIO)


@dataclasses.dataclass(frozen=True)
class TargetSettings:
    """The config keys that say which target task to load."""

    target: object  # a name, or an own target's object
    target_dir: str | None
    target_classes: list[int] | None
    test_per_class: int | None
    on_corrupt: str
    seed: int


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """The config keys that say where the source task's images are."""

    source: str | None
    source_dir: str | None
    source_classes: list[int] | None


class SourceImages(NamedTuple):
    """Source validation images (Table 3) and the pretrained accuracy."""

    x: np.ndarray
    y: np.ndarray
    pretrained_accuracy: float


class DataSet(NamedTuple):
    """One data set of an experiment (one column of Table 2).

    Attributes:
        slug: its name in the run records (e.g. `"caltech256_30"`).
        per_class: training images per class (None: the official split).
        target: its `ArrayTarget` or `ImageTarget`.
        train_part: indices of the training images validation runs train on.
        held_out: indices of the training images they are validated on.
        everything: indices of all training images (test runs train on).
        r2_inputs: the training images activations are compared on.
        source: the source validation images, or None.
    """

    slug: str
    per_class: int | None
    target: object
    train_part: np.ndarray
    held_out: np.ndarray
    everything: np.ndarray
    r2_inputs: np.ndarray
    source: SourceImages | None


def _seed_pairs(seed):
    return tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True
    ).batch(2)


class ArrayTarget:
    """Images held in memory (Fashion-MNIST): resize, mirror and crop.

    The paper's augmentation at small scale: images are resized to
    `image_size` (default `input_size * 256 / 224`) px; training takes a
    random `input_size` crop and a random mirror, testing the central crop.
    """

    # No image file to read, hence none skipped.
    skipped = ()

    def __init__(
        self, x_train, y_train, x_test, y_test, images, channels, num_classes
    ):
        self.x_train = x_train
        self.labels = y_train
        self.x_test = x_test
        self.y_test = y_test
        self.images = images
        self.channels = channels
        self.num_classes = num_classes

    def _resize(self, image):
        size = self.images.resized_size
        image = tf.image.resize(tf.cast(image, tf.float32), (size, size))
        if self.channels == 3:
            image = datasets.preprocessing.three_channels(image)
        return image

    def _finish(self, image):
        if self.images.preprocessing == "mobilenet":
            return datasets.preprocessing.mobilenet_scale(image)
        return image

    def train_batches(self, train_indices, seed):
        size = self.images.input_size

        def augment(example, seed_pair):
            image, label = example
            seeds = tf.random.experimental.stateless_split(seed_pair, num=2)
            image = self._resize(image)
            mirror = tf.random.stateless_uniform([], seeds[0]) < 0.5
            image = tf.cond(mirror, lambda: image[:, ::-1, :], lambda: image)
            image = tf.image.stateless_random_crop(
                image, (size, size, image.shape[-1]), seeds[1]
            )
            return self._finish(image), label

        data = tf.data.Dataset.from_tensor_slices(
            (self.x_train[train_indices], self.labels[train_indices])
        )
        data = data.shuffle(len(train_indices), seed=seed).repeat()
        return (
            tf.data.Dataset.zip((data, _seed_pairs(seed)))
            .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(self.images.batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def eval_batches(self, train_indices, split, indices=None):
        del train_indices  # no statistic of the training images is used
        x, y = (
            (self.x_train, self.labels)
            if split == "train"
            else (self.x_test, self.y_test)
        )
        if indices is not None:
            x, y = x[indices], y[indices]
        size = self.images.input_size
        offset = (self.images.resized_size - size) // 2

        def central(image, label):
            image = self._resize(image)
            image = image[:, offset : offset + size, offset : offset + size]
            return self._finish(image), label

        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .batch(self.images.batch_size)
            .map(central, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
        )


class ImageTarget:
    """An `ImageData` through the paper's pre-processing pipeline.

    The channel mean subtracted is that of the images a run trains on (the
    training part during validation, the whole training set for tests).
    """

    def __init__(self, data, images):
        self.data = data
        self.images = images
        self.skipped = data.skipped
        self.num_classes = data.num_classes
        self.labels = np.array(
            [
                int(y)
                for y in data.train.map(lambda x, y: y).as_numpy_iterator()
            ],
            dtype="int32",
        )
        self._means = {}

    def _subset(self, indices):
        keep = np.zeros(len(self.labels), dtype=bool)
        keep[indices] = True
        keep = tf.constant(keep)
        return (
            self.data.train.enumerate()
            .filter(lambda i, example: tf.gather(keep, i))
            .map(lambda i, example: example)
        )

    def _mean(self, train_indices):
        key = hashlib.sha1(np.asarray(train_indices).tobytes()).hexdigest()
        if key not in self._means:
            if self.images.preprocessing == "mobilenet":
                self._means[key] = np.full(3, 127.5, dtype="float32")
            else:
                self._means[key] = datasets.channel_mean(
                    self._subset(train_indices),
                    image_size=self.images.resized_size,
                )
        return self._means[key]

    def _batches(self, dataset, train_indices, training, seed=0):
        images = self.images
        batches = datasets.paper_preprocessing(
            dataset,
            self._mean(train_indices),
            training=training,
            image_size=images.resized_size,
            crop_size=images.input_size,
            batch_size=images.batch_size,
            seed=seed,
            color_order=images.color_order,
        )
        if images.preprocessing == "mobilenet":
            batches = batches.map(lambda x, y: (x / 127.5, y))
        return batches

    def train_batches(self, train_indices, seed):
        return self._batches(
            self._subset(train_indices), train_indices, True, seed
        )

    def eval_batches(self, train_indices, split, indices=None):
        dataset = self.data.train if split == "train" else self.data.test
        if split == "train" and indices is not None:
            dataset = self._subset(indices)
        return self._batches(dataset, train_indices, False)

    def preprocess(self, dataset, train_indices):
        """Test-time batches of other `(image, label)` examples (source
        images), with the channel mean of the images `train_indices`."""
        return self._batches(dataset, train_indices, False)


def _fashion_arrays(classes, train=True):
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    x, y = (x_train, y_train) if train else (x_test, y_test)
    return fashion_source.select_classes(x, y, classes)


def load_target(settings, images, channels, per_class):
    """The target task of one data set (`per_class` images per class).

    Args:
        settings: a `TargetSettings`.
        images: an `ImageSettings`.
        channels: the channels the backbone takes.
        per_class: training images per class (None: the official split).

    Returns:
        An `ArrayTarget` (Fashion-MNIST) or an `ImageTarget`.
    """
    if settings.target == "fashion_mnist":
        classes = settings.target_classes or list(range(10))
        x_train, y_train = _fashion_arrays(classes, train=True)
        x_test, y_test = _fashion_arrays(classes, train=False)
        draw = datasets.few_shot(y_train, per_class, seed=settings.seed)
        if settings.test_per_class is not None:
            test = datasets.few_shot(
                y_test, settings.test_per_class, seed=settings.seed
            )
            x_test, y_test = x_test[test], y_test[test]
        return ArrayTarget(
            x_train[draw],
            y_train[draw],
            x_test,
            y_test,
            images,
            channels,
            len(classes),
        )
    if settings.target == "caltech256":
        data = datasets.load_caltech256(
            settings.target_dir,
            per_class=per_class,
            seed=settings.seed,
            on_corrupt=settings.on_corrupt,
        )
    elif settings.target == "mit_indoor67":
        data = datasets.load_mit_indoor67(
            settings.target_dir,
            seed=settings.seed,
            on_corrupt=settings.on_corrupt,
        )
    else:
        data = datasets.load_stanford_dogs(data_dir=settings.target_dir)
    return ImageTarget(data, images)


def validation_split(labels, fraction, seed):
    """Holds out `fraction` of each class's training images (at least 1)."""
    rng = np.random.default_rng(seed + 10_000)
    train, validation = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held = max(1, round(fraction * len(members)))
        if held >= len(members):
            raise ConfigError(
                "Config key 'validation_fraction' leaves no training image "
                f"in class {label} ({len(members)} images). Received: "
                f"validation_fraction={fraction!r}"
            )
        validation.extend(members[:held])
        train.extend(members[held:])
    return np.sort(train), np.sort(validation)


class SourceData:
    """The source task's images, as the fine-tuned network takes them.

    Args:
        settings: a `SourceSettings` (with a `source`).
        images: the `ImageSettings` of the target.
        channels: the channels the backbone takes.
    """

    def __init__(self, settings, images, channels):
        self.settings = settings
        self.images = images
        self.channels = channels

    def arrays(self, target, train_indices, count, split):
        """`count` preprocessed source images (and labels) as NumPy arrays.

        `split` is `"train"` (Fisher inputs) or `"test"` (the source task's
        validation images, Table 3). Source images go through the target's
        test-time pre-processing, which the fine-tuned network expects.
        """
        settings = self.settings
        if settings.source == "fashion_mnist":
            x, y = _fashion_arrays(
                settings.source_classes, train=split == "train"
            )
            x, y = x[:count], y[:count]
            arrays = ArrayTarget(
                x, y, x, y, self.images, self.channels, num_classes=None
            )
            return materialize(arrays.eval_batches(None, "train"))
        loader = (
            datasets.load_imagenet
            if settings.source == "imagenet"
            else datasets.load_places365
        )
        data = loader(data_dir=settings.source_dir)
        dataset = (data.train if split == "train" else data.test).take(count)
        return materialize(target.preprocess(dataset, train_indices))


def materialize(batches):
    """`(x, y)` NumPy arrays of all the batches of a dataset."""
    xs, ys = [], []
    for x, y in batches:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    return np.concatenate(xs), np.concatenate(ys)
