"""Measurements on fine-tuned models: how far the weights moved.

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 4.4.
"""

import numpy as np

from keras_sp import penalties

__all__ = [
    "predict",
    "reestimate_batchnorm",
    "source_task_accuracy",
    "unit_drift",
    "weight_drift",
]


def predict(model, x, batch_size=256):
    """`model(x)` in inference mode, batch by batch, as a NumPy array.

    Unlike `model.predict`, it traces nothing, so calling it on many freshly
    built models (one per run) costs no retracing.
    """
    from keras import ops

    outputs = [
        ops.convert_to_numpy(model(x[i : i + batch_size], training=False))
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs)


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
    >>> model = keras_sp.regularize(model, "l2_sp", alpha=0.1)
    >>> [row["distance"] for row in keras_sp.analysis.unit_drift(model)]
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


def reestimate_batchnorm(model, x, batch_size=256):
    """Sets every BatchNormalization's moving statistics to those of `x`.

    Layer by layer in order, the exact mean and (biased) variance of the
    layer's input over all of `x` replace its moving mean and variance, so
    later layers see inputs normalised with the new statistics. This changes
    `model` in place; `source_task_accuracy` calls it on a copy.

    Args:
        model: a functional `keras.Model` (a nested functional backbone is
            fine) whose BatchNormalization layers are called once each.
        x: NumPy array of inputs.
        batch_size: batch size of the forward passes.

    Returns:
        The number of BatchNormalization layers updated.
    """
    import keras

    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner_x = x
            if layer is not model.layers[0]:
                prefix = keras.Model(model.input, layer.input)
                inner_x = predict(prefix, x, batch_size)
            count += reestimate_batchnorm(layer, inner_x, batch_size)
        elif isinstance(layer, keras.layers.BatchNormalization):
            features = predict(
                keras.Model(model.input, layer.input), x, batch_size
            )
            axis = layer.axis % features.ndim
            reduce = tuple(i for i in range(features.ndim) if i != axis)
            features = features.astype("float64")
            layer.moving_mean.assign(features.mean(axis=reduce))
            layer.moving_variance.assign(features.var(axis=reduce))
            count += 1
    return count


def source_task_accuracy(
    backbone, source_head, x, y, *, batchnorm="as_trained", batch_size=256
):
    """Accuracy on the source task of a fine-tuned backbone (Table 3).

    The fine-tuned backbone is evaluated with the original classification
    layer of the source task, without retraining, as in the paper's Table 3.
    BatchNormalization moving statistics drift toward the target task during
    fine-tuning and cost much source accuracy on their own, so say which
    ones a reported number uses:

    - `"as_trained"`: the moving statistics as fine-tuning left them;
    - `"reestimated"`: recomputed on `x` first (`reestimate_batchnorm`), on
      a copy of the backbone; the given backbone is not changed.

    Args:
        backbone: the fine-tuned feature extractor (a `keras.Model`).
        source_head: the source task's classifier (a layer or model mapping
            the backbone's output to source-class scores).
        x: source-task inputs (NumPy).
        y: integer source-task labels.
        batchnorm: `"as_trained"` or `"reestimated"`.
        batch_size: batch size of the forward passes.

    Returns:
        The top-1 accuracy, a float.

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, Table 3.
    """
    import keras

    if batchnorm not in ("as_trained", "reestimated"):
        raise ValueError(
            "`batchnorm` must be 'as_trained' or 'reestimated'. Received: "
            f"batchnorm={batchnorm!r}"
        )
    if batchnorm == "reestimated":
        copy = keras.models.clone_model(backbone)
        copy.set_weights(backbone.get_weights())
        reestimate_batchnorm(copy, x, batch_size)
        backbone = copy
    features = predict(backbone, x, batch_size)
    scores = keras.ops.convert_to_numpy(source_head(features))
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(y)))
