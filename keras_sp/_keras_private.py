"""Every use of Keras internals in keras-sp, in one place.

Each helper says why public Keras is not enough. `tests/keras_private_test.py`
fails if a Keras release changes what these helpers rely on.
"""

from keras.src.models.functional import Functional
from keras.src.saving.keras_saveable import KerasSaveable

__all__ = [
    "KerasSaveable",
    "acknowledge_trainable_state",
    "all_layers",
    "is_functional",
    "keras_logits",
    "optimizer_variables",
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


def is_functional(model):
    """Whether `model` is a graph of layers built with `keras.Model(inputs,
    outputs)` (or a `keras.applications` model), not a subclassed model.

    Public Keras does not export the class of such models; `keras_sp.widen`
    and `keras_sp.deepen` can only copy a model layer by layer through its
    graph.
    """
    return isinstance(model, Functional)


def optimizer_variables(optimizer):
    """The model variables a built optimizer updates, in its order.

    Keras optimizers are built once for a list of variables and refuse
    others afterwards; public Keras does not expose that list.
    """
    return list(optimizer._trainable_variables)


def acknowledge_trainable_state(model):
    """Records the model's current `trainable` flags as the compiled ones.

    `fit` and `evaluate` warn when a layer's `trainable` flag changed since
    `compile`, because the optimizer and the train function would not see the
    change. keras-sp rebuilds both after every change it makes, so the
    warning would be false; public Keras has no way to say so.
    """
    model._compiled_trainable_state = {
        layer: layer.trainable for layer in model._flatten_layers()
    }


def keras_logits(tensor):
    """The logits a Keras `softmax` (or `sigmoid`) computed `tensor` from.

    On the TensorFlow backend, `keras.activations.softmax` and
    `keras.ops.softmax` record their input on the symbolic output as
    `_keras_logits`, which Keras's crossentropy reads back to work from
    logits instead of log(0); there is no public accessor. Returns None for
    other tensors (and for eager tensors, which cannot carry it).
    """
    return getattr(tensor, "_keras_logits", None)
