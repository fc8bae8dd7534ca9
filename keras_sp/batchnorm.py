"""Recomputing BatchNormalization statistics on new data.

Fine-tuning moves the BatchNormalization moving statistics toward the
target task; `reestimate_batchnorm` recomputes them exactly on given
inputs, e.g. to measure how much source-task accuracy the fine-tuned
weights themselves keep (Table 3 of Li, Grandvalet & Davoine).

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 4.4 and Table 3.
"""

import keras
import numpy as np

__all__ = [
    "reestimate_batchnorm",
]


def _predict(model, x, batch_size):
    """`model(x)` in inference mode, batch by batch, as a NumPy array."""
    outputs = [
        keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False))
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs)


def reestimate_batchnorm(model, x, batch_size=256):
    """Sets every BatchNormalization's moving statistics to those of `x`.

    Layer by layer in order, the exact mean and (biased) variance of the
    layer's input over all of `x` replace its moving mean and variance, so
    later layers see inputs normalised with the new statistics. This changes
    `model` in place; work on a copy (`keras.models.clone_model` and
    `set_weights`) to keep the original.

    Args:
        model: a functional `keras.Model` (a nested functional backbone is
            fine) whose BatchNormalization layers are called once each.
        x: NumPy array of inputs.
        batch_size: batch size of the forward passes.

    Returns:
        The number of BatchNormalization layers updated.

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((2,))
    >>> model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    >>> x = np.array([[0.0, 1.0], [2.0, 5.0]])
    >>> reestimate_batchnorm(model, x)
    1
    >>> keras.ops.convert_to_numpy(model.layers[-1].moving_mean).tolist()
    [1.0, 3.0]
    """
    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner_x = x
            if layer is not model.layers[0]:
                prefix = keras.Model(model.input, layer.input)
                inner_x = _predict(prefix, x, batch_size)
            count += reestimate_batchnorm(layer, inner_x, batch_size)
        elif isinstance(layer, keras.layers.BatchNormalization):
            features = _predict(
                keras.Model(model.input, layer.input), x, batch_size
            )
            axis = layer.axis % features.ndim
            reduce = tuple(i for i in range(features.ndim) if i != axis)
            features = features.astype("float64")
            layer.moving_mean.assign(features.mean(axis=reduce))
            layer.moving_variance.assign(features.var(axis=reduce))
            count += 1
    return count
