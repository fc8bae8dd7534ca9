"""Every use of Keras internals in keras-sp, in one place.

Each helper says why public Keras is not enough. `tests/keras_private_test.py`
fails if a Keras release changes what these helpers rely on.
"""

from keras.src.saving.keras_saveable import KerasSaveable

__all__ = [
    "KerasSaveable",
    "all_layers",
    "keras_logits",
    "own_trainable_variables",
    "own_variables",
]

# `keras.saving` walks a model's attributes and saves the variables of every
# `KerasSaveable` it meets (layers, optimizers, metrics...). A regularizer that
# derives from it and names an object type the walk knows is saved with the
# layer that holds it as `kernel_regularizer`: its starting point and Fisher
# land in the `.keras` / `.weights.h5` file and never in a config. There is
# no public hook for this.
SAVEABLE_OBJ_TYPE = "Loss"


def all_layers(model):
    """Every layer inside `model`, nested models and sublayers flattened.

    Public Keras only lists the direct layers of a functional or Sequential
    model; `_flatten_layers` also reaches sublayers of custom layers (such as
    the layer a `keras.layers.Wrapper` holds).
    """
    return list(model._flatten_layers(include_self=False, recursive=True))


def own_variables(layer):
    """The variables `layer` created itself, trainable or not.

    `layer.weights` also lists sublayers' variables, and once a layer is
    frozen `variable.trainable` no longer says which variables it trains.
    """
    return list(layer._trainable_variables) + list(
        layer._non_trainable_variables
    )


def own_trainable_variables(layer):
    """The variables `layer` trains when it is trainable (frozen or not)."""
    return list(layer._trainable_variables)


def keras_logits(tensor):
    """The logits a Keras `softmax` (or `sigmoid`) computed `tensor` from.

    On the TensorFlow backend, `keras.activations.softmax` and
    `keras.ops.softmax` record their input on the symbolic output as
    `_keras_logits`, which Keras's crossentropy reads back to work from
    logits instead of log(0); there is no public accessor. Returns None for
    other tensors (and for eager tensors, which cannot carry it).
    """
    return getattr(tensor, "_keras_logits", None)
