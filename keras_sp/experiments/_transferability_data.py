"""The transferability experiment's tasks: the images of each half of the
classes (A and B), from arrays in memory or a tfds data set, prepared for
the network (Yosinski et al., NIPS 2014)."""

import keras
import numpy as np

from keras_sp.experiments.data import class_split
from keras_sp.experiments.data import few_shot
from keras_sp.experiments.data import load_fashion_mnist


def _prepare_images(images, config):
    """uint8-range images (n, h, w[, c]) -> float32 (n, size, size, c)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] != config.channels:
        if images.shape[-1] == 1:
            images = np.repeat(images, config.channels, axis=-1)
        else:
            raise ValueError(
                f"Images have {images.shape[-1]} channels; the config asks "
                f"for channels={config.channels}."
            )
    images = images.astype("float32")
    if images.shape[1:3] != (config.image_size, config.image_size):
        size = (config.image_size, config.image_size)
        images = np.concatenate(
            [
                keras.ops.convert_to_numpy(
                    keras.ops.image.resize(images[i : i + 4096], size)
                )
                for i in range(0, len(images), 4096)
            ]
        )
    return images


def _in_memory_task(arrays, classes, per_class, seed, config):
    """(images, labels renumbered 0..len(classes)-1) of `classes`."""
    images, labels = arrays
    labels = np.asarray(labels).astype("int64")
    if per_class is None:
        chosen = np.flatnonzero(np.isin(labels, classes))
    else:
        chosen = few_shot(labels, per_class, seed=seed, classes=classes)
    relabelled = np.searchsorted(classes, labels[chosen]).astype("int32")
    return _prepare_images(np.asarray(images)[chosen], config), relabelled


def _tfds_task(config, classes, split, training, seed):
    """A tf.data pipeline of (image, label) for `classes` of a tfds dataset.

    TensorFlow-only: tensorflow-datasets yields tf.data pipelines.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    name = config.dataset[len("tfds:") :]
    dataset = tfds.load(
        name,
        split=split,
        as_supervised=True,
        data_dir=config.data_dir,
        shuffle_files=training,
    )
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(classes, tf.int64),
            tf.range(len(classes), dtype=tf.int64),
        ),
        default_value=-1,
    )
    size = (config.image_size, config.image_size)

    def relabel(image, label):
        image = tf.image.resize(tf.cast(image, tf.float32), size)
        if image.shape[-1] != config.channels:
            image = tf.image.grayscale_to_rgb(image)
        return image, tf.cast(table.lookup(tf.cast(label, tf.int64)), "int32")

    dataset = dataset.filter(
        lambda image, label: table.lookup(tf.cast(label, tf.int64)) >= 0
    ).map(relabel, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        dataset = dataset.shuffle(10 * config.batch_size, seed=seed)
    return dataset.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


class TaskData:
    """The two halves of the classes, their training and test data."""

    def __init__(self, config, arrays):
        self.config = config
        self.arrays = arrays
        if arrays is None and config.dataset == "fashion_mnist":
            self.arrays = load_fashion_mnist(config.data_dir)
        if self.arrays is not None:
            all_classes = np.unique(np.asarray(self.arrays[0][1]))
        else:
            import tensorflow_datasets as tfds

            builder = tfds.builder(
                config.dataset[len("tfds:") :], data_dir=config.data_dir
            )
            count = builder.info.features["label"].num_classes
            all_classes = np.arange(count)
        self.halves = dict(
            zip(
                "AB",
                class_split(all_classes, seed=config.split_seed),
                strict=True,
            )
        )
        self._cache = {}

    def task(self, half, training):
        """Training (`training=True`) or test data of half "A" or "B"."""
        key = (half, training)
        if key not in self._cache:
            config = self.config
            classes = self.halves[half]
            if self.arrays is None:
                split = config.train_split if training else config.test_split
                self._cache[key] = _tfds_task(
                    config, classes, split, training, config.seed
                )
            else:
                arrays = self.arrays[0] if training else self.arrays[1]
                per_class = (
                    config.per_class if training else config.test_per_class
                )
                self._cache[key] = _in_memory_task(
                    arrays, classes, per_class, config.split_seed, config
                )
        return self._cache[key]
