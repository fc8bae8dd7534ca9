"""The outputs of `keras_sp.fisher.diagonal_fisher`: log f_k(x) and rows.

Backend-neutral (`keras.ops` only). Two things live here:

- `Outputs`: how the log-probabilities log f_k(x) are read from the model.
  A final softmax is found from the model's *output layer* (a
  `keras.layers.Softmax`, an `Activation("softmax")` layer, or a layer
  built with `activation="softmax"`, looked up through nested Functional
  and Sequential models); its logits are then obtained by calling the model
  with that softmax replaced by the identity for the duration of the call,
  and log-softmax of the logits is taken (no log(0) for a confident
  model). A final sigmoid is found the same way.
- `rows`: for each example of a batch, the classes c_ir whose squared
  scores enter the sum, and their weights w_ir, in each mode; the labels of
  `"sampled"` are drawn here, on the host, with NumPy.
"""

import contextlib
import inspect

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_sp import _keras_private

__all__ = [
    "Outputs",
    "check_outputs",
    "describe",
    "inference_arguments",
    "rows",
]

# Probabilities are clipped at this value before their log is taken when
# the model outputs probabilities that keras-sp cannot trace back to logits
# (as Keras's crossentropy does).
PROBABILITY_EPSILON = 1e-7

# Tolerance on the row sums of outputs that are taken as probabilities.
_PROBABILITY_TOLERANCE = 1e-3


def inference_arguments(model):
    """`{"training": False}` when `model.call` takes `training` (as
    `model(x)` would pass it), otherwise nothing: `model.stateless_call`
    passes its keyword arguments to `call` as they are."""
    parameters = inspect.signature(model.call).parameters.values()
    if any(
        p.name == "training" or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in parameters
    ):
        return {"training": False}
    return {}


def output_layer(model):
    """The layer computing the single output of a Functional or Sequential
    model (looked up through nested models), or None when unknown."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs or len(outputs) != 1 or not model.layers:
        return None
    layer = model.layers[-1]
    if isinstance(layer, keras.Model):
        return output_layer(layer)
    return layer


def _named(function, name):
    return function is not None and (
        function is getattr(keras.activations, name)
        or getattr(function, "__name__", None) == name
    )


def final_activation(layer):
    """`"softmax"`, `"sigmoid"` or None: the last function of `layer`."""
    if layer is None:
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    for name in ("softmax", "sigmoid"):
        if _named(activation, name):
            return name
    return None


def _identity_call(inputs, mask=None):
    return inputs


@contextlib.contextmanager
def _without_softmax(layer):
    """`layer` computes its logits (no final softmax) inside the block."""
    name = "call" if isinstance(layer, keras.layers.Softmax) else "activation"
    replacement = _identity_call if name == "call" else keras.activations.linear
    with _keras_private.overridden([(layer, name, lambda _: replacement)]):
        yield


class Outputs:
    """How log f_k(x) is read from a model's outputs.

    Args:
        model: the classifier.
        from_logits: None, True or False, as in `diagonal_fisher`.
    """

    def __init__(self, model, from_logits):
        layer = output_layer(model)
        # Keyword arguments of `model.stateless_call` (inference mode).
        self.inference = inference_arguments(model)
        self.kind = final_activation(layer)
        self.from_logits = from_logits
        # The softmax to remove, when the logits before it are used.
        self.softmax_layer = None
        if self.kind == "softmax" and from_logits is not True:
            self.softmax_layer = layer
        self.use_logits = (
            from_logits is not False or self.softmax_layer is not None
        )

    @property
    def key(self):
        """Identifies the computation (for caches of compiled functions)."""
        return (self.use_logits, id(self.softmax_layer))

    def log_probabilities(self, call):
        """log f_k(x), float32, of shape (batch, K), from `call()`: a
        function calling the model in inference mode."""
        context = contextlib.nullcontext()
        if self.softmax_layer is not None:
            context = _without_softmax(self.softmax_layer)
        with context:
            outputs = call()
        output = ops.cast(tree.flatten(outputs)[0], "float32")
        if self.use_logits:
            return ops.log_softmax(output, axis=-1)
        return ops.log(ops.clip(output, PROBABILITY_EPSILON, 1.0))


def describe(model, x):
    """Calls `model` on `x` in inference mode and describes its outputs:
    `"count"` (output tensors), `"shape"` and `"values"` (NumPy) of the
    first output, and `"kind"` (its final activation, when known)."""
    try:
        outputs = tree.flatten(model(x, training=False))
    except Exception as error:
        shapes = [tuple(np.shape(a)) for a in tree.flatten(x)]
        raise ValueError(
            f"Model '{model.name}' could not be called on a batch of "
            f"`data` ({type(error).__name__}: {error}). Received: input "
            f"shapes {shapes}"
        ) from error
    values = ops.convert_to_numpy(outputs[0])
    return {
        "count": len(outputs),
        "shape": values.shape,
        "kind": final_activation(output_layer(model)),
        "values": values,
    }


def check_outputs(info, from_logits):
    """Raises unless the model has one categorical output; returns K."""
    if info["count"] != 1:
        raise ValueError(
            "The Fisher information needs a model with one output, a "
            "categorical distribution over classes. Received: a model with "
            f"{info['count']} outputs"
        )
    shape = info["shape"]
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(
            "The Fisher information needs a classification output of shape "
            "(batch, K) with K >= 2 classes (logits or softmax "
            f"probabilities). Received: an output of shape {shape}"
        )
    values = info["values"].astype("float64")
    looks_like_probabilities = (
        np.all(values >= 0)
        and np.all(values <= 1)
        and np.all(np.abs(values.sum(axis=1) - 1) < _PROBABILITY_TOLERANCE)
    )
    if from_logits is None and info["kind"] == "sigmoid":
        raise ValueError(
            "The model ends in a sigmoid: its outputs are independent "
            "probabilities, not a categorical distribution over classes. "
            "The Fisher information needs a softmax or a linear (logits) "
            "last layer. Received: from_logits=None"
        )
    if from_logits is False and info["kind"] != "softmax":
        if not looks_like_probabilities:
            raise ValueError(
                "With from_logits=False the model's outputs must be "
                "probabilities (non-negative rows summing to 1), but they "
                f"are not (row sums in [{values.sum(axis=1).min():.4g}, "
                f"{values.sum(axis=1).max():.4g}]). Received: "
                "from_logits=False"
            )
    if from_logits is None and info["kind"] is None:
        if looks_like_probabilities:
            raise ValueError(
                "The model's outputs look like probabilities, but no final "
                "softmax was found to recover the logits from. Pass "
                "from_logits=False if they are probabilities, or "
                "from_logits=True if they are logits. Received: "
                "from_logits=None"
            )
    return int(shape[1])


def row_count(mode, samples, num_classes):
    """Backward passes per example: all classes in "exact", and in
    "sampled" the draws, or the classes (weighted by counts) when there are
    at least as many draws as classes."""
    if mode == "exact" or (mode == "sampled" and samples >= num_classes):
        return num_classes
    if mode == "sampled":
        return samples
    return 1


def draw(probabilities, samples, generator):
    """`samples` labels per example drawn from the rows of `probabilities`
    (inverse transform of `samples` uniforms per example, taken in order
    from `generator`: the draws of an example do not depend on the batch
    it falls in)."""
    uniforms = generator.random((len(probabilities), samples))
    cumulative = np.cumsum(probabilities, axis=1)
    thresholds = uniforms * cumulative[:, -1:]
    labels = np.sum(cumulative[:, None, :] <= thresholds[:, :, None], axis=2)
    return np.minimum(labels, probabilities.shape[1] - 1)


def rows(mode, samples, num_classes, count, size, *, log_p, labels, generator):
    """Classes `c` and weights `w`, both (size, R), of a batch of `size`
    examples whose first `count` are real (the others are padding, weight
    0), where `R = row_count(mode, samples, num_classes)`:

    - `"empirical"`: c = the label, w = 1;
    - `"exact"`: c = 0..K-1, w = f_c(x_i);
    - `"sampled"`, S = `samples` < K: c = the S draws, w = 1/S;
    - `"sampled"`, S >= K: c = 0..K-1, w = (draws equal to c) / S.
    """
    mask = (np.arange(size) < count).astype("float64")[:, None]
    if mode == "empirical":
        return labels[:, None].astype("int32"), mask.astype("float32")
    everything = np.broadcast_to(
        np.arange(num_classes, dtype="int32"), (size, num_classes)
    )
    probabilities = np.exp(np.asarray(log_p, "float64"))
    if mode == "exact":
        return everything, (probabilities * mask).astype("float32")
    drawn = np.zeros((size, samples), "int32")
    drawn[:count] = draw(probabilities[:count], samples, generator)
    if samples >= num_classes:
        counts = (drawn[:, :, None] == everything[:, None, :]).sum(axis=1)
        return everything, (counts * mask / samples).astype("float32")
    return drawn, np.broadcast_to(mask / samples, drawn.shape).astype("float32")
