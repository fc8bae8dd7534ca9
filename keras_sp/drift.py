"""How far fine-tuning moved the weights from their starting point.

`weight_drift` gives ||w - w0|| over the whole model and `unit_drift` per
depth unit; `keras_sp.callbacks.PenaltyMonitor` logs both during `fit`. A
comparison of penalties where the weights barely moved says nothing about
the penalties.

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 4.4.
"""

import numpy as np

from keras_sp import _selection
from keras_sp import penalties

__all__ = [
    "unit_drift",
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
    >>> model = keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=())
    >>> keras_sp.weight_drift(model)["distance"]
    0.0
    """
    if starting_point is None:
        starting_point = penalties.starting_point(model)
    return _drift(model.weights, starting_point)


def _drift(variables, starting_point):
    squared_distance = 0.0
    squared_norm = 0.0
    compared = 0
    for variable in variables:
        reference = starting_point.get(variable.path)
        if reference is None:
            continue
        reference = np.asarray(reference, dtype="float64")
        value = _selection.to_numpy(variable).astype("float64")
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


def unit_drift(model, starting_point=None):
    """The distance ||w - w0|| of each depth unit from its starting point.

    Args:
        model: a `keras.Model` that `keras_sp.depth_units` can split.
        starting_point: `{variable.path: array}`; defaults to the starting
            point attached by `keras_sp.regularize`.

    Returns:
        A list with one dict per depth unit that has a starting point, in
        depth order: `"unit"` (its index in `depth_units(model)`), `"name"`
        (its first layer's name), `"distance"` and `"relative"`
        (`distance / ||w0||` over the unit).

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3),
    ...                           keras.layers.Dense(1)])
    >>> model = keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=())
    >>> [row["distance"] for row in keras_sp.unit_drift(model)]
    [0.0, 0.0]
    """
    from keras_sp import units

    if starting_point is None:
        starting_point = penalties.starting_point(model)
    rows = []
    for index, unit in enumerate(units.depth_units(model)):
        reference = {}
        for layer in unit:
            for variable in layer.weights:
                if variable.path in starting_point:
                    reference[variable.path] = starting_point[variable.path]
        if not reference:
            continue

        drift = _drift([v for layer in unit for v in layer.weights], reference)
        rows.append(
            {
                "unit": index,
                "name": unit[0].name,
                "distance": drift["distance"],
                "relative": drift["relative"],
            }
        )
    return rows
