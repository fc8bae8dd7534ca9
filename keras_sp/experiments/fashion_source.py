"""A small CNN pretrained on Fashion-MNIST classes, cached: a real source task.

The demo, the growing comparison and tests use it as a pretrained network
that trains on a CPU in about a minute: Fashion-MNIST classes 0-4 (T-shirt,
trouser, pullover, dress, coat) are the source task, classes 5-9 (sandal,
shirt, sneaker, bag, ankle boot) the target task.
"""

import hashlib
import json
import os

import keras
import numpy as np

from keras_sp.callbacks import StopOnNonFinite
from keras_sp.experiments.data import load_fashion_mnist
from keras_sp.experiments.results import READ_ERRORS
from keras_sp.experiments.results import CorruptFileError
from keras_sp.experiments.results import atomic_write
from keras_sp.experiments.results import check_archive
from keras_sp.experiments.results import write_text
from keras_sp.experiments.weights import cache_directory

__all__ = [
    "SOURCE_CLASSES",
    "TARGET_CLASSES",
    "build_small_cnn",
    "pretrained_source_model",
    "select_classes",
]

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


def build_small_cnn(
    num_classes,
    input_shape=(28, 28, 1),
    width=16,
    fc_units=128,
    head_name="head",
):
    """A three-block CNN with BatchNormalization, an `fc` layer and a head.

    The model is `Sequential([backbone, head])`: `backbone` (a functional
    model named "backbone") maps uint8-range images to the `fc` features;
    `head` is a Dense layer of logits.

    Args:
        num_classes: int, number of outputs of the head.
        input_shape: image shape (height, width, channels), values 0-255.
        width: filters of the first convolution (doubled per block).
        fc_units: units of the fully connected layer `fc` at the end of the
            backbone, or None for none (the head then reads the pooled
            features, as a ResNet's classifier does).
        head_name: name of the classifier layer.

    Returns:
        A built `keras.Sequential`.
    """
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for block, filters in enumerate((width, 2 * width, 4 * width), start=1):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"conv{block}"
        )(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        if block < 3:
            x = keras.layers.MaxPooling2D(name=f"pool{block}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if fc_units:
        x = keras.layers.Dense(fc_units, activation="relu", name="fc")(x)
    backbone = keras.Model(inputs, x, name="backbone")
    head = keras.layers.Dense(num_classes, name=head_name)
    model = keras.Sequential([backbone, head], name="small_cnn")
    model.build((None,) + tuple(input_shape))
    return model


def select_classes(images, labels, classes):
    """Examples of `classes`, with labels renumbered 0..len(classes)-1."""
    classes = np.asarray(classes)
    keep = np.isin(labels, classes)
    relabel = np.searchsorted(classes, labels[keep])
    return images[keep][..., None], relabel.astype("int32")


def pretrained_source_model(
    epochs=4,
    seed=0,
    batch_size=128,
    width=16,
    fc_units=128,
    verbose=1,
    cache=True,
):
    """The small CNN trained on Fashion-MNIST classes 0-4 (cached on disk).

    The first call trains it (about a minute on two CPU cores) and saves it
    under `cache_directory()`: the model (`fashion_source_<hash>.keras`),
    then its metadata (`fashion_source_<hash>.json`, written last: the
    cache is used only when both exist). Both are written atomically
    (`keras_sp.experiments.results.atomic_write`), so an interrupted save
    leaves no partial file. Later calls load them; a cached file that
    cannot be read (truncated, damaged) raises `CorruptFileError` naming it,
    and deleting the two files trains the model again. The source head is
    the layer named "source_head".

    Args:
        epochs: training epochs over the 30,000 source images.
        seed: seed of the initialization and shuffling.
        batch_size: training batch size.
        width: see `build_small_cnn`.
        fc_units: see `build_small_cnn`.
        verbose: Keras verbosity while training.
        cache: whether to read and write the cache.

    Returns:
        `(model, source_test_accuracy)`.
    """
    settings = {
        "classes": SOURCE_CLASSES,
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "width": width,
        "fc_units": fc_units,
        "keras": keras.__version__,
        "version": 2,
    }
    digest = hashlib.sha256(
        json.dumps(settings, sort_keys=True).encode()
    ).hexdigest()[:12]
    path = os.path.join(cache_directory(), f"fashion_source_{digest}.keras")
    info_path = path.replace(".keras", ".json")
    if cache and os.path.exists(path) and os.path.exists(info_path):
        return _load_cached(path, info_path)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    x_train, y_train = select_classes(x_train, y_train, SOURCE_CLASSES)
    x_test, y_test = select_classes(x_test, y_test, SOURCE_CLASSES)
    keras.utils.set_random_seed(seed)
    model = build_small_cnn(
        len(SOURCE_CLASSES),
        width=width,
        fc_units=fc_units,
        head_name="source_head",
    )
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(2e-3, steps)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train.astype("float32"),
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        verbose=verbose,
        callbacks=[StopOnNonFinite()],
    )
    _, accuracy = model.evaluate(
        x_test.astype("float32"), y_test, batch_size=512, verbose=0
    )
    if cache:
        with atomic_write(path) as temporary:
            model.save(temporary)
        write_text(
            info_path,
            json.dumps({"source_test_accuracy": accuracy, **settings}),
        )
    return model, float(accuracy)


def _load_cached(path, info_path):
    """`(model, source accuracy)` from the cache files, or CorruptFileError."""
    remedy = (
        f"Delete {path!r} and {info_path!r} to train the source model again."
    )
    try:
        with open(info_path) as handle:
            accuracy = float(json.load(handle)["source_test_accuracy"])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptFileError(
            info_path,
            f"it is not the source model's metadata ({error!r}), perhaps "
            "truncated",
            remedy,
        ) from error
    try:
        check_archive(path)
        model = keras.saving.load_model(path)
    except READ_ERRORS as error:
        raise CorruptFileError(
            path,
            f"it is not a readable Keras model ({error!r}), perhaps truncated",
            remedy,
        ) from error
    return model, accuracy
