"""Measurements on fine-tuned models: how far the weights moved.

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 4.4.
"""

import numpy as np

from keras_sp import penalties

__all__ = [
    "weight_drift",
]


def weight_drift(model, starting_point=None):
    """The distance ||w - w0|| of the model's weights from a starting point.

    `distance = sqrt(sum_j (w_j - w0_j)^2)` over every variable that has a
    starting point, and `relative = distance / ||w0||`. A comparison of
    penalties where `relative` stays near 0 says nothing about them: the
    weights did not move.

    Args:
        model: a `keras.Model`.
        starting_point: `{variable.path: array}`; defaults to the starting
            point attached by `keras_sp.regularize`
            (`keras_sp.starting_point(model)`).

    Returns:
        A dict with `"distance"`, `"reference_norm"` (||w0||), `"relative"`
        and `"variables"` (how many variables were compared).

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model = keras_sp.regularize(model, "l2_sp", alpha=0.1)
    >>> keras_sp.analysis.weight_drift(model)["distance"]
    0.0
    """
    if starting_point is None:
        starting_point = penalties.starting_point(model)
    squared_distance = 0.0
    squared_norm = 0.0
    compared = 0
    for variable in model.weights:
        reference = starting_point.get(variable.path)
        if reference is None:
            continue
        reference = np.asarray(reference, dtype="float64")
        value = np.asarray(variable.numpy(), dtype="float64")
        if value.shape != reference.shape:
            raise ValueError(
                f"`starting_point['{variable.path}']` must have shape "
                f"{value.shape}. Received: an array of shape "
                f"{reference.shape}"
            )
        squared_distance += float(np.sum((value - reference) ** 2))
        squared_norm += float(np.sum(reference**2))
        compared += 1
    distance = float(np.sqrt(squared_distance))
    norm = float(np.sqrt(squared_norm))
    return {
        "distance": distance,
        "reference_norm": norm,
        "relative": distance / norm if norm > 0 else float("nan"),
        "variables": compared,
    }
