"""The source -> target settings a comparison runs on.

- `fashion`: the small CNN pretrained here on Fashion-MNIST classes 0-4
  (cached) -> classes 5-9, 28 px, tested on their 5,000 test images. Source
  and target are near: same images, other classes.
- `mobilenet`: the ImageNet MobileNet V1 (converted once by `keras-sp
  convert-mobilenet`) -> the 10 Fashion-MNIST classes, resized to
  `input_size` px, gray repeated to three channels, scaled to [-1, 1]
  inside the backbone; its source head is the ImageNet classifier (1000
  logits, background dropped). Source and target are far apart.

Each returns a `Setting`: the source model (layers "backbone" and
"source_head"), the target's training and test images (uint8 28 x 28, a
channel axis added) and the layers DELTA matches.
"""

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_sp.experiments import fashion_source
from keras_sp.experiments import training
from keras_sp.experiments.data import load_fashion_mnist

__all__ = [
    "SETTINGS",
    "Setting",
    "augmented_dataset",
    "load_setting",
]

SETTINGS = ("fashion", "mobilenet")


class Setting(NamedTuple):
    """A source model and a target task."""

    source: keras.Model
    source_accuracy: float | None
    data: dict
    num_classes: int
    delta_layers: tuple


def _fashion(config, verbose, with_source):
    source, accuracy = None, None
    if with_source:
        source, accuracy = fashion_source.pretrained_source_model(
            epochs=config.pretrain_epochs,
            width=config.source_width,
            fc_units=None,
            verbose=2 if verbose else 0,
        )
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    x, y = fashion_source.select_classes(
        x_train, y_train, fashion_source.TARGET_CLASSES
    )
    x_t, y_t = fashion_source.select_classes(
        x_test, y_test, fashion_source.TARGET_CLASSES
    )
    data = {"x": x, "y": y, "x_test": x_t, "y_test": y_t}
    return Setting(
        source,
        accuracy,
        data,
        len(fashion_source.TARGET_CLASSES),
        ("relu2", "relu3"),
    )


def mobilenet_source(input_size, weights_path=None):
    """The ImageNet MobileNet V1 as a source model for 28 x 28 gray images.

    Returns:
        `keras.Sequential([backbone, source_head])`: the backbone maps
        `(28, 28, 1)` images in 0..255 to the 1024 average-pooled features
        (`x / 127.5 - 1`, bilinear resize to `input_size`, gray repeated to
        three channels, then MobileNet); `source_head` is a Dense layer
        holding the ImageNet classifier (`conv_preds`, 1000 logits).
    """
    from keras_sp.experiments.weights import imagenet_mobilenet

    size = (input_size, input_size, 3)
    full = imagenet_mobilenet(
        input_shape=size,
        classifier_activation=None,
        weights_path=weights_path,
    )
    base = imagenet_mobilenet(
        input_shape=size,
        include_top=False,
        pooling="avg",
        weights_path=weights_path,
    )
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)
    x = keras.layers.Resizing(input_size, input_size, name="resize")(x)
    x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    backbone = keras.Model(inputs, base(x), name="backbone")
    kernel, bias = full.get_layer("conv_preds").get_weights()
    head = keras.layers.Dense(kernel.shape[-1], name="source_head")
    source = keras.Sequential([backbone, head], name="imagenet_mobilenet")
    source.build((None, 28, 28, 1))
    head.set_weights([kernel.reshape(-1, kernel.shape[-1]), bias])
    return source


def _mobilenet(config, verbose, with_source):
    source = mobilenet_source(config.input_size) if with_source else None
    (x, y), (x_t, y_t) = load_fashion_mnist()
    if config.test_per_class is not None:
        keep = np.concatenate(
            [
                np.flatnonzero(y_t == c)[: config.test_per_class]
                for c in range(10)
            ]
        )
        x_t, y_t = x_t[np.sort(keep)], y_t[np.sort(keep)]
    data = {"x": x[..., None], "y": y, "x_test": x_t[..., None], "y_test": y_t}
    return Setting(
        source, None, data, 10, ("conv_pw_12_relu", "conv_pw_13_relu")
    )


def load_setting(config, verbose=1, with_source=True):
    """The `Setting` named by `config.setting`; without its source model
    (None) when `with_source` is False (reporting on finished runs)."""
    loader = {"fashion": _fashion, "mobilenet": _mobilenet}[config.setting]
    setting = loader(config, verbose, with_source)
    data = dict(setting.data)
    data["x"] = data["x"].astype("float32")
    data["x_test"] = data["x_test"].astype("float32")
    return setting._replace(data=data)


def augmented_dataset(x, y, batch_size, seed, shift=2):
    """Shuffled, repeated batches of `(x, y)` with a random shift of up to
    `shift` pixels each way (reflected border) and a random horizontal
    flip, drawn from `seed` and the example's position in the stream."""
    height, width = x.shape[1:3]

    def augment(index, example):
        image, label = example
        seeds = tf.stack([tf.cast(seed, tf.int64), index])
        padded = tf.pad(
            image, [[shift, shift], [shift, shift], [0, 0]], mode="REFLECT"
        )
        image = tf.image.stateless_random_crop(
            padded, (height, width, image.shape[-1]), seed=seeds
        )
        image = tf.image.stateless_random_flip_left_right(image, seed=seeds + 1)
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat().enumerate().map(augment)
    return training.light_pipeline(dataset.batch(batch_size))
