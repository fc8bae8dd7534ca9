"""WiSE-FT: interpolating in weight space between w0 and the fine-tuned
weights.

Wortsman et al. ensemble a pretrained model and its fine-tuned version in
weight space (eq. 1):

    theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1

with theta_0 the starting point (keras-sp's w0), theta_1 the fine-tuned
weights and alpha in [0, 1], chosen on held-out data. keras-sp already
stores w0 for its -SP penalties; `record_starting_point` stores it without
a penalty, `interpolate` sets the model to theta_alpha (called `weight`
here, since `alpha` is the -SP penalty's strength) and
`interpolation_curve` evaluates the model along the path.

Reference:
    Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes,
    Hajishirzi, Farhadi, Namkoong, Schmidt. "Robust fine-tuning of
    zero-shot models". CVPR 2022, eq. 1.
"""

import math
import numbers
import warnings
import weakref

import keras
import numpy as np

from keras_sp import _paths
from keras_sp import _selection
from keras_sp import penalties
from keras_sp._checks import check_built_model
from keras_sp.batchnorm import reestimate_batchnorm

__all__ = [
    "interpolate",
    "interpolation_curve",
    "record_starting_point",
]


def _check_model(model):
    check_built_model(model)
    _paths.check_unique_paths(model)


def record_starting_point(model, *, new_layers=None, overwrite=False):
    """Records the model's current weights as its starting point w0.

    Every floating-point variable of the layers outside `new_layers`,
    trainable or not (kernels, biases, BatchNormalization gamma and beta,
    and its moving mean and variance), gets a frozen NumPy copy of its
    current value as w0, in the memory `keras_sp.regularize` and
    `keras_sp.starting_point` read (kept while the model lives, in this
    process). No penalty is attached. Call it on the pretrained model with
    its new head, before plain fine-tuning, to interpolate toward w0
    afterwards with `interpolate` (WiSE-FT, Wortsman et al. 2022, eq. 1:
    theta_alpha = (1 - alpha) theta_0 + alpha theta_1). A later
    `keras_sp.regularize` measures its -SP penalties from these w0.

    A w0 already recorded for a variable (by an earlier call, by
    `regularize`, also for the variables it does not penalize, or carried
    by an attached -SP penalty) is kept: only the variables without one are
    recorded. `overwrite=True` replaces the
    recorded w0 by the current weights, and raises a `ValueError` (changing
    nothing) when one of those variables carries an attached -SP penalty,
    whose own w0 would then disagree: call
    `keras_sp.regularize(model, ..., starting_point=model)` to move both,
    or `keras_sp.unregularize(model)` first.

    Args:
        model: a built `keras.Model`.
        new_layers: layers (or layer names) of `model` that are new for the
            target task, such as the new classifier. They get no w0, and
            `interpolate` leaves them at their fine-tuned values. Omitting
            it (None) treats every layer as pretrained and warns; pass
            `new_layers=()` when the model has no new layer.
        overwrite: bool, whether to replace the w0 already recorded
            (default False: keep them).

    Returns:
        The model.

    Example:

    >>> import keras, keras_sp
    >>> from keras_sp.interpolation import record_starting_point
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(4, name="pretrained"),
    ...                           keras.layers.Dense(2, name="head")],
    ...                          name="net")
    >>> _ = record_starting_point(model, new_layers=["head"])
    >>> sorted(keras_sp.starting_point(model))
    ['net/pretrained/bias', 'net/pretrained/kernel']
    >>> model.losses  # no penalty attached
    []
    """
    if not isinstance(overwrite, bool):
        raise ValueError(
            "`overwrite` must be True or False. Received: "
            f"overwrite={overwrite!r}"
        )
    _check_model(model)
    if new_layers is None:
        warnings.warn(
            "record_starting_point() was called without `new_layers`: every "
            "layer is treated as pretrained, so a new classifier gets its "
            "random initialisation as w0. Pass the new layers (e.g. "
            "new_layers=['head']), or new_layers=() if the model has none.",
            UserWarning,
            stacklevel=2,
        )
        new_layers = ()
    new_layers = _selection.resolve_new_layers(model, new_layers)
    variables = _selection.shared_variables(model, new_layers)
    if overwrite:
        ids = {id(variable) for variable in variables}
        penalized = sorted(
            variable.path
            for _, variable, regularizer in penalties.attached_penalties(model)
            if isinstance(regularizer, penalties._STARTING_POINT_PENALTIES)
            and id(variable) in ids
        )
        if penalized:
            raise ValueError(
                f"overwrite=True would change the w0 of {len(penalized)} "
                f"variables that carry an -SP penalty (e.g. {penalized[:3]}) "
                "and leave the penalties' own w0 as they are. Call "
                "keras_sp.regularize(model, ..., starting_point=model) to "
                "move both, or keras_sp.unregularize(model) first. "
                "Received: overwrite=True"
            )
    penalties.remember_attached(model)
    memory = penalties.memory_of(model)
    recorded = _paths.PathDict(memory.starting_point)
    unpenalized = _paths.PathDict(memory.unpenalized)
    for variable in variables:
        path = variable.path
        if overwrite or (path not in recorded and path not in unpenalized):
            memory.starting_point[path] = _selection.frozen_copy(variable)
        elif path not in recorded:
            # The w0 `regularize` kept for a variable it does not penalize.
            memory.starting_point[path] = unpenalized[path]
    return model


class _Endpoint:
    """The fine-tuned weights of one model (`{path: array}` of every
    variable) and the values `interpolate` last left in it."""

    def __init__(self, fine_tuned):
        self.fine_tuned = fine_tuned
        self.left = fine_tuned


# Keyed by model, dropped with it.
_ENDPOINTS = weakref.WeakKeyDictionary()


def _read(model):
    return {v.path: _selection.to_numpy(v).copy() for v in model.weights}


def _same(a, b):
    if a.keys() != b.keys():
        return False
    return all(
        a[path].dtype == b[path].dtype
        and a[path].shape == b[path].shape
        and a[path].tobytes() == b[path].tobytes()
        for path in a
    )


def _assign(model, values):
    for variable in model.weights:
        if variable.path in values:
            variable.assign(values[variable.path])


def _check_weight(name, value):
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ValueError(
            f"`{name}` must be a finite real number in [0, 1]. Received: "
            f"{name}={value!r}"
        )
    return float(value)


def _as_inputs(data, argument):
    """`data` (an array, or a dataset of batches of inputs or of
    `(inputs, targets)`) as one NumPy array of inputs."""
    if isinstance(data, (list, tuple)) or hasattr(data, "__array__"):
        array = np.asarray(keras.ops.convert_to_numpy(data))
    else:
        try:
            iterator = iter(data)
        except TypeError:
            raise ValueError(
                f"`{argument}` must be an array or a dataset of input "
                f"batches. Received: {argument} of type "
                f"{type(data).__name__}"
            ) from None
        batches = []
        for batch in iterator:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            batches.append(keras.ops.convert_to_numpy(batch))
        array = np.concatenate(batches) if batches else np.zeros((0,))
    if array.ndim == 0 or len(array) == 0:
        raise ValueError(
            f"`{argument}` must hold at least one input. Received: "
            f"{argument} of shape {array.shape}"
        )
    return array


def _check_batch_size(batch_size):
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(
            "`batch_size` must be a positive integer. Received: "
            f"batch_size={batch_size!r}"
        )
    return int(batch_size)


def _plan(model):
    """`{path: (w0, variable)}` for the model's variables that have a w0."""
    references = penalties.starting_point(model)
    memory = penalties._MEMORY.get(model)
    unpenalized = _paths.PathDict(memory.unpenalized if memory else {})
    plan = {}
    for variable in model.weights:
        if not keras.backend.is_float_dtype(variable.dtype):
            continue
        w0 = references.get(variable.path)
        if w0 is None:
            w0 = unpenalized.get(variable.path)
        if w0 is None:
            continue
        w0 = np.asarray(w0)
        if w0.shape != tuple(variable.shape):
            raise ValueError(
                f"The starting point of variable '{variable.path}' has shape "
                f"{w0.shape}, the variable {tuple(variable.shape)}. Record "
                "it again with keras_sp.record_starting_point(model, "
                "overwrite=True)."
            )
        plan[variable.path] = w0
    if not plan:
        raise ValueError(
            f"Model '{model.name}' has no starting point recorded: nothing "
            "to interpolate from. Call keras_sp.record_starting_point(model, "
            "new_layers=[...]) on the pretrained weights before fine-tuning, "
            "or fine-tune with keras_sp.regularize(model, ...), which "
            "records it."
        )
    return plan


def _endpoint(model):
    """The fine-tuned endpoint: the one remembered, unless the weights
    changed since `interpolate` last set them (then the current ones)."""
    current = _read(model)
    endpoint = _ENDPOINTS.get(model)
    if endpoint is None or not _same(current, endpoint.left):
        endpoint = _Endpoint(current)
    return endpoint


def _interpolated(plan, fine_tuned, weight):
    """theta_alpha = (1 - alpha) theta_0 + alpha theta_1 (Wortsman et al.
    2022, eq. 1) in float64, cast to the variable's dtype."""
    values = {}
    for path, w0 in plan.items():
        w_ft = fine_tuned[path]
        if weight == 1:
            values[path] = w_ft
            continue
        mixed = (1 - weight) * w0.astype("float64") + weight * w_ft.astype(
            "float64"
        )
        values[path] = mixed.astype(w_ft.dtype)
    return values


def interpolate(model, weight, *, batchnorm_data=None, batch_size=256):
    """Sets the model to the WiSE-FT interpolation of w0 and its fine-tuned
    weights.

    Every variable with a recorded starting point w0
    (`keras_sp.starting_point(model)`: from `record_starting_point`,
    `keras_sp.regularize`, or the -SP penalties a loaded model carries;
    and the w0 `regularize` keeps in memory for the shared variables it
    does not penalize) becomes, as in Wortsman et al. 2022, eq. 1,

        theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1

    with theta_0 = w0, theta_1 the fine-tuned value and alpha = `weight`,
    computed in float64 and cast to the variable's dtype. Variables without
    a w0 (the new head) keep their fine-tuned values. BatchNormalization
    moving statistics with a w0 are interpolated like the other variables;
    with `batchnorm_data` they are instead re-estimated on those inputs
    afterwards (`keras_sp.reestimate_batchnorm`).

    The fine-tuned weights are remembered at the first call (a copy of
    every variable, kept while the model lives), so that later calls at
    other weights all start from the same endpoint and `weight=1.0` gives
    the fine-tuned weights back bit for bit (BatchNormalization statistics
    included, unless `batchnorm_data` re-estimates them). If the weights
    changed since the last call (more training, `set_weights`), the current
    weights become the new endpoint.

    Args:
        model: a built `keras.Model` with a recorded starting point.
        weight: float in [0, 1], alpha of eq. 1: 0 gives w0, 1 the
            fine-tuned weights.
        batchnorm_data: optional inputs (a NumPy array, or a dataset of
            input batches or `(inputs, targets)` batches, gathered in
            memory) on which to re-estimate the BatchNormalization moving
            statistics; `model` must then be a functional or Sequential
            model, as `reestimate_batchnorm` needs.
        batch_size: batch size of the re-estimation's forward passes.

    Returns:
        The model. On error it is left as it was.

    Example:

    >>> import keras, numpy as np
    >>> from keras_sp.interpolation import interpolate, record_starting_point
    >>> model = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    >>> _ = record_starting_point(model, new_layers=())   # w0 = 1
    >>> model.set_weights([np.array([[3.0], [5.0]])])     # "fine-tuned"
    >>> _ = interpolate(model, 0.25)
    >>> keras.ops.convert_to_numpy(model.layers[0].kernel).ravel().tolist()
    [1.5, 2.0]
    >>> _ = interpolate(model, 1.0)
    >>> keras.ops.convert_to_numpy(model.layers[0].kernel).ravel().tolist()
    [3.0, 5.0]

    Reference:
        Wortsman et al. "Robust fine-tuning of zero-shot models". CVPR
        2022, eq. 1.
    """
    weight = _check_weight("weight", weight)
    _check_model(model)
    batch_size = _check_batch_size(batch_size)
    if batchnorm_data is not None:
        batchnorm_data = _as_inputs(batchnorm_data, "batchnorm_data")
    plan = _plan(model)
    endpoint = _endpoint(model)
    _set(model, endpoint, plan, weight, batchnorm_data, batch_size)
    return model


def _set(model, endpoint, plan, weight, batchnorm_data, batch_size):
    """Interpolates from `endpoint` (whose `left` is the model's current
    weights); on error, puts those back."""
    before = endpoint.left
    try:
        _assign(model, _interpolated(plan, endpoint.fine_tuned, weight))
        if batchnorm_data is not None:
            reestimate_batchnorm(model, batchnorm_data, batch_size)
    except BaseException:
        _assign(model, before)
        raise
    endpoint.left = _read(model)
    _ENDPOINTS[model] = endpoint


def _check_weights(weights):
    if isinstance(weights, (str, bytes, numbers.Number)) or not hasattr(
        weights, "__iter__"
    ):
        raise ValueError(
            "`weights` must be a list of numbers in [0, 1]. Received: "
            f"weights={weights!r}"
        )
    if isinstance(weights, np.ndarray):
        weights = weights.ravel()
    weights = list(weights)
    if not weights:
        raise ValueError(
            "`weights` must hold at least one number in [0, 1]. Received: "
            "weights=[]"
        )
    return [
        _check_weight(f"weights[{i}]", value) for i, value in enumerate(weights)
    ]


def interpolation_curve(
    model,
    weights,
    x,
    y=None,
    *,
    batch_size=None,
    batchnorm_data=None,
    verbose="auto",
):
    """Evaluates the model along the WiSE-FT path from w0 to its
    fine-tuned weights.

    For each `alpha` in `weights`, `interpolate(model, alpha)` (Wortsman et
    al. 2022, eq. 1: theta_alpha = (1 - alpha) theta_0 + alpha theta_1),
    then `model.evaluate(x, y, return_dict=True)`. The model is left at
    its fine-tuned weights afterwards, also when an evaluation raises.

    Args:
        model: a compiled `keras.Model` with a recorded starting point.
        weights: list of floats in [0, 1], the alphas to evaluate.
        x: the inputs, passed to `model.evaluate`.
        y: the targets, passed to `model.evaluate` (None for a dataset).
        batch_size: passed to `model.evaluate`, and the batch size of the
            BatchNormalization re-estimation (default 256 there).
        batchnorm_data: optional inputs on which the BatchNormalization
            moving statistics are re-estimated at each weight (see
            `interpolate`).
        verbose: `"auto"`, 0, 1 or 2, as in Keras: 0 is silent, 1 (and
            `"auto"`) a progress bar over the weights, 2 one line when done.

    Returns:
        A list with one dict per weight, `{"weight": alpha, **metrics}`, the
        metrics as `model.evaluate` returns them.

    Example:

    >>> import keras, numpy as np
    >>> from keras_sp.interpolation import (interpolation_curve,
    ...                                     record_starting_point)
    >>> model = keras.Sequential([keras.Input((1,)),
    ...     keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    >>> _ = record_starting_point(model, new_layers=())   # w0 = 0
    >>> model.set_weights([np.array([[2.0]])])            # "fine-tuned"
    >>> model.compile(loss="mse")
    >>> x, y = np.ones((4, 1)), np.full((4, 1), 2.0)
    >>> curve = interpolation_curve(model, [0.0, 0.5, 1.0], x, y, verbose=0)
    >>> [(c["weight"], round(c["loss"], 4)) for c in curve]
    [(0.0, 4.0), (0.5, 1.0), (1.0, 0.0)]

    Reference:
        Wortsman et al. "Robust fine-tuning of zero-shot models". CVPR
        2022, eq. 1 and section 3.
    """
    weights = _check_weights(weights)
    if verbose not in ("auto", 0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(
            "`verbose` must be 'auto', 0, 1 or 2. Received: "
            f"verbose={verbose!r}"
        )
    verbose = 1 if verbose == "auto" else verbose
    _check_model(model)
    if batchnorm_data is not None:
        batchnorm_data = _as_inputs(batchnorm_data, "batchnorm_data")
    plan = _plan(model)
    endpoint = _endpoint(model)
    progress = None
    curve = []
    try:
        for weight in weights:
            _set(
                model, endpoint, plan, weight, batchnorm_data, batch_size or 256
            )
            metrics = model.evaluate(
                x, y, batch_size=batch_size, verbose=0, return_dict=True
            )
            point = {"weight": weight}
            point.update({k: float(v) for k, v in metrics.items()})
            curve.append(point)
            if verbose:
                if progress is None:
                    progress = keras.utils.Progbar(
                        len(weights), verbose=verbose, stateful_metrics=point
                    )
                progress.update(len(curve), values=list(point.items()))
    finally:
        _assign(model, endpoint.fine_tuned)
        endpoint.left = endpoint.fine_tuned
        _ENDPOINTS[model] = endpoint
    return curve
