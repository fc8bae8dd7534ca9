"""Attach the -SP penalties to a Keras model in one call.

The regularized objective of the paper (eq. 3 and its variants) penalizes the
parameters w_S of the layers inherited from the source model (the *shared*
part) with one of the -SP penalties, and the parameters of the new layers
(the new classifier) with plain L2:

    Omega(w) = penalty_alpha(w_S; w0_S) + beta / 2 * ||w_new||^2

`regularize` builds one regularizer per penalized variable and sets it both
on the variable (so `model.losses` includes it) and, when the layer has the
matching argument (`kernel_regularizer`, `depthwise_regularizer`, ...), on
the layer, so that the layer's config names it and saving the model saves
the penalty with its starting point and Fisher weights.
"""

import weakref

import keras
import numpy as np

from keras_sp import _keras_private
from keras_sp import regularizers

__all__ = [
    "KINDS",
    "PENALIZE",
    "attached_penalties",
    "regularize",
    "starting_point",
    "unregularize",
]

KINDS = (
    "l2",
    "l2_sp",
    "l2_sp_fisher",
    "l1_sp",
    "group_lasso_sp",
    "group_lasso_sp_fisher",
)
FISHER_KINDS = ("l2_sp_fisher", "group_lasso_sp_fisher")
PENALIZE = ("kernels", "all")

# Variable names Keras gives to convolution, depthwise and dense kernels.
KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")
# For a variable name, the layer arguments that hold its regularizer, in the
# order to try (a DepthwiseConv2D names its kernel "kernel" but takes
# `depthwise_regularizer`).
REGULARIZER_ATTRIBUTES = {
    "kernel": ("kernel_regularizer", "depthwise_regularizer"),
    "depthwise_kernel": ("depthwise_regularizer",),
    "pointwise_kernel": ("pointwise_regularizer",),
    "bias": ("bias_regularizer",),
    "gamma": ("gamma_regularizer",),
    "beta": ("beta_regularizer",),
    "embeddings": ("embeddings_regularizer",),
}
_OURS = (regularizers.L2, regularizers._StartingPointPenalty)

# Starting points of the shared part recorded by `regularize(kind="l2")`,
# whose penalty does not use them, so that the distance ||w - w0|| can still
# be monitored. Keyed by model, dropped with it.
_L2_REFERENCES = weakref.WeakKeyDictionary()


class _Missing:
    pass


_MISSING = _Missing()


def _matching_keys(mapping, path):
    """The keys of `mapping` for a variable `path`: exactly, or as a
    '/'-aligned suffix.

    A source model nested in the target (or the target's backbone used alone
    as the source) gives paths that differ by a leading scope, so
    `"resnet50/conv1_conv/kernel"` matches `"conv1_conv/kernel"`. The
    Fisher module matches saved Fisher files by the same rule.
    """
    if path in mapping:
        return [path]
    return [
        key
        for key in mapping
        if path.endswith("/" + key) or key.endswith("/" + path)
    ]


def _lookup(mapping, path, argument):
    """Finds `path` in `mapping` (see `_matching_keys`)."""
    candidates = _matching_keys(mapping, path)
    if len(candidates) > 1:
        raise ValueError(
            f"`{argument}` has several entries matching variable '{path}': "
            f"{sorted(candidates)}. Pass a mapping keyed by the exact "
            "`variable.path` of the model's variables."
        )
    if candidates:
        return mapping[candidates[0]]
    return _MISSING


def _as_mapping(value, argument):
    if isinstance(value, keras.Model):
        if not value.weights:
            raise ValueError(
                f"`{argument}` is a model without weights (not built). "
                f"Received: {argument}={value.name!r}"
            )
        return {variable.path: variable for variable in value.weights}
    if hasattr(value, "items"):
        return dict(value.items())
    raise ValueError(
        f"`{argument}` must be a keras.Model or a mapping from variable path "
        f"to array. Received: {argument} of type {type(value).__name__}"
    )


def _to_numpy(value):
    if isinstance(value, keras.Variable):
        return np.array(value.numpy())
    return np.asarray(value)


def _layers_in(model):
    return [model] + _keras_private.all_layers(model)


def _resolve_new_layers(model, new_layers):
    if isinstance(new_layers, (keras.layers.Layer, str)):
        new_layers = [new_layers]
    try:
        new_layers = list(new_layers)
    except TypeError:
        raise ValueError(
            "`new_layers` must be a list of layers (or layer names) of the "
            f"model. Received: new_layers={new_layers!r}"
        ) from None
    layers = _keras_private.all_layers(model)
    by_name = {}
    for layer in layers:
        by_name.setdefault(layer.name, []).append(layer)
    resolved = []
    for index, item in enumerate(new_layers):
        if isinstance(item, str):
            matches = by_name.get(item, [])
            if len(matches) != 1:
                reason = "no" if not matches else f"{len(matches)}"
                raise ValueError(
                    f"`new_layers[{index}]`: model '{model.name}' has {reason} "
                    f"layer named '{item}'. Received: new_layers={new_layers!r}"
                )
            item = matches[0]
        elif not isinstance(item, keras.layers.Layer):
            raise ValueError(
                f"`new_layers[{index}]` must be a layer or a layer name. "
                f"Received: new_layers[{index}]={item!r}"
            )
        elif not any(item is layer for layer in layers):
            raise ValueError(
                f"`new_layers[{index}]`: layer '{item.name}' is not in model "
                f"'{model.name}'. Received: new_layers="
                f"{[getattr(x, 'name', x) for x in new_layers]}"
            )
        resolved.append(item)
    return resolved


def _penalized_variables(model, penalize):
    """Returns `[(layer, variable)]` for the variables `penalize` selects."""
    selected = []
    seen = set()
    for layer in _layers_in(model):
        for variable in _keras_private.own_trainable_variables(layer):
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            if penalize == "kernels" and variable.name not in KERNEL_NAMES:
                continue
            selected.append((layer, variable))
    return selected


def _group_axes(layer, variable):
    """Groups are output channels; a depthwise kernel's are (channel, mult)."""
    rank = len(variable.shape)
    depthwise = variable.name == "depthwise_kernel" or (
        variable.name == "kernel"
        and isinstance(
            layer,
            (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D),
        )
    )
    if depthwise and rank >= 3:
        return tuple(range(rank - 2))
    return None


def _check_unique_paths(model):
    counts = {}
    for variable in model.weights:
        counts[variable.path] = counts.get(variable.path, 0) + 1
    repeated = sorted(path for path, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(
            f"Model '{model.name}' has several variables with the same path "
            f"({repeated[:3]}); keras-sp keys starting points and Fisher "
            "weights by `variable.path`. Give the layers unique names."
        )


def attached_penalties(model):
    """The keras-sp penalties on `model`'s variables.

    Args:
        model: a built `keras.Model`.

    Returns:
        A list of `(layer, variable, regularizer)` for every variable that
        carries a keras-sp regularizer, in the order of `model.weights`.
    """
    owners = {}
    for layer in _layers_in(model):
        for variable in _keras_private.own_variables(layer):
            owners.setdefault(id(variable), layer)
    attached = []
    for variable in model.weights:
        if isinstance(variable.regularizer, _OURS):
            attached.append(
                (owners[id(variable)], variable, variable.regularizer)
            )
    return attached


def starting_point(model):
    """The starting point w0 the model's shared part is measured against.

    Args:
        model: a model given to `regularize`, or loaded from a file saved
            after it.

    Returns:
        A dict `{variable.path: np.ndarray}`: the w0 of every -SP penalty
        attached, or for `kind="l2"` the weights the model had when
        `regularize` was called (kept in memory only). Empty when the model
        carries neither.
    """
    references = dict(_L2_REFERENCES.get(model, {}))
    for _, variable, regularizer in attached_penalties(model):
        if isinstance(regularizer, regularizers._StartingPointPenalty):
            if regularizer.starting_point is not None:
                references[variable.path] = regularizer.starting_point
    return references


def _detach(model):
    for layer in _layers_in(model):
        for variable in _keras_private.own_variables(layer):
            if isinstance(variable.regularizer, _OURS):
                variable.regularizer = None
        for attributes in REGULARIZER_ATTRIBUTES.values():
            for attribute in attributes:
                if isinstance(getattr(layer, attribute, None), _OURS):
                    setattr(layer, attribute, None)
    _L2_REFERENCES.pop(model, None)


def _attach(layer, variable, regularizer):
    variable.regularizer = regularizer
    for attribute in REGULARIZER_ATTRIBUTES.get(variable.name, ()):
        if hasattr(layer, attribute):
            current = getattr(layer, attribute)
            if current is None or isinstance(current, _OURS):
                setattr(layer, attribute, regularizer)
            break


def _reset_compiled_functions(model):
    # A traced train step holds the penalties it was traced with.
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    if getattr(model, "test_function", None) is not None:
        model.make_test_function(force=True)


def unregularize(model):
    """Removes every penalty `regularize` attached to `model`.

    Regularizers that keras-sp did not attach are left as they are.

    Args:
        model: a `keras.Model`.

    Returns:
        The model.
    """
    _detach(model)
    _reset_compiled_functions(model)
    return model


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. Received: "
            f"{name}={value!r}"
        )


def regularize(
    model,
    kind,
    *,
    alpha,
    beta=0.0,
    new_layers=(),
    starting_point=None,
    fisher=None,
    penalize="kernels",
    fisher_epsilon=0.0,
    fisher_clip=None,
):
    """Attaches an -SP penalty (or the L2 baseline) to a built model.

    The shared part (every layer not in `new_layers`, nested models
    included) gets the penalty `kind` with strength `alpha`; the new layers
    get `beta / 2 * ||w||^2` (eq. 3: the new classifier is pulled toward 0,
    not toward w0):

    | kind | shared part | eq. |
    |---|---|---|
    | `"l2"` | alpha/2 ‖w‖² | 1 |
    | `"l2_sp"` | alpha/2 ‖w − w0‖² | 2-3 |
    | `"l2_sp_fisher"` | alpha/2 Σ_j F_j (w_j − w0_j)² | 4 |
    | `"l1_sp"` | alpha ‖w − w0‖₁ | 5 |
    | `"group_lasso_sp"` | alpha Σ_g √p_g ‖w_g − w0_g‖₂ | 6 |
    | `"group_lasso_sp_fisher"` | α Σ_g √p_g (Σ_{j∈g} F_j (w_j − w0_j)²)^½ | 7 |

    Calling `regularize` again replaces the penalties (nothing is counted
    twice) and keeps the starting point already attached unless
    `starting_point` is given; `unregularize` removes them. A compiled
    model's train and test functions are rebuilt so the next step uses the
    new penalties.

    Args:
        model: a built `keras.Model`.
        kind: one of `"l2"`, `"l2_sp"`, `"l2_sp_fisher"`, `"l1_sp"`,
            `"group_lasso_sp"`, `"group_lasso_sp_fisher"`.
        alpha: non-negative float, the strength on the shared part.
        beta: non-negative float, the strength of L2 on the new layers.
        new_layers: layers (or layer names) of `model` that are new for the
            target task, such as the new classifier.
        starting_point: w0. `None` keeps the starting point a previous call
            attached, and otherwise takes a frozen copy of the model's
            current weights. A `keras.Model` (the pretrained model) or a
            mapping `{variable.path: array}` gives it explicitly.
        fisher: for the Fisher kinds, `{variable.path: array}` as
            `keras_sp.fisher.diagonal_fisher` returns for the source model.
            Matched to the shared variables by path, also when the source
            model is nested in the target (a '/'-aligned path suffix).
            `None` keeps a Fisher a previous call attached.
        penalize: `"kernels"` (default, as the authors' code: convolution,
            depthwise and dense kernels only) or `"all"` (every trainable
            variable, biases and BatchNormalization gamma/beta included).
        fisher_epsilon: non-negative float added to F (default 0, the
            paper's raw F; the authors' code offered F + epsilon).
        fisher_clip: optional positive float; F is clipped at this maximum
            before `fisher_epsilon` is added (default: no clipping).

    Returns:
        The model.

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.Dense(2, name="head")])
    >>> model = keras_sp.regularize(model, "l2_sp", alpha=0.1, beta=0.01,
    ...                             new_layers=["head"])
    >>> float(sum(model.losses)) > 0  # beta/2 ||w_head||^2; w = w0 elsewhere
    True

    Reference:
        Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer
        Learning with Convolutional Networks". ICML 2018, eqs. 1-7.
    """
    _check_choice("kind", kind, KINDS)
    alpha = regularizers.check_coefficient("alpha", alpha)
    beta = regularizers.check_coefficient("beta", beta)
    _check_choice("penalize", penalize, PENALIZE)
    fisher_epsilon = regularizers.check_coefficient(
        "fisher_epsilon", fisher_epsilon
    )
    if fisher_clip is not None:
        fisher_clip = regularizers.check_coefficient("fisher_clip", fisher_clip)
        if fisher_clip == 0:
            raise ValueError(
                "`fisher_clip` must be positive (or None for no clipping). "
                f"Received: fisher_clip={fisher_clip!r}"
            )
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model. Received: model of type "
            f"{type(model).__name__}"
        )
    if not model.built or not model.weights:
        raise ValueError(
            f"Model '{model.name}' is not built: it has no weights yet. Call "
            "`model.build(input_shape)` or call it on data first. Received: "
            f"model={model.name!r}"
        )
    uses_fisher = kind in FISHER_KINDS
    if fisher is not None and not uses_fisher:
        raise ValueError(
            f"`fisher` is only used by the kinds {list(FISHER_KINDS)}. "
            f"Received: kind={kind!r} with a fisher"
        )
    _check_unique_paths(model)
    new_layers = _resolve_new_layers(model, new_layers)

    new_ids = set()
    for layer in new_layers:
        new_ids.update(id(x) for x in _layers_in(layer))
    selected = _penalized_variables(model, penalize)
    for layer, variable in selected:
        current = variable.regularizer
        if current is not None and not isinstance(current, _OURS):
            raise ValueError(
                f"Variable '{variable.path}' already has a regularizer that "
                f"keras-sp did not attach ({current!r}). Remove it first "
                f"(set `{layer.name}`'s regularizer argument and "
                "`variable.regularizer` to None)."
            )
    shared = [(lay, var) for lay, var in selected if id(lay) not in new_ids]
    new = [(lay, var) for lay, var in selected if id(lay) in new_ids]
    if not shared and not new:
        raise ValueError(
            f"Model '{model.name}' has no variable for penalize={penalize!r} "
            "to regularize."
        )

    # The starting point and Fisher already attached are kept by default.
    previous = {}
    for _, variable, regularizer in attached_penalties(model):
        if isinstance(regularizer, regularizers._StartingPointPenalty):
            previous[variable.path] = (
                regularizer.starting_point,
                regularizer.fisher,
            )
    previous_l2 = _L2_REFERENCES.get(model, {})

    references = None
    if starting_point is not None:
        references = _as_mapping(starting_point, "starting_point")
    fisher_mapping = None
    if fisher is not None:
        fisher_mapping = _as_mapping(fisher, "fisher")

    plan = []
    for layer, variable in shared:
        path = variable.path
        shape = tuple(variable.shape)
        if references is not None:
            w0 = _lookup(references, path, "starting_point")
            if w0 is _MISSING:
                raise ValueError(
                    f"`starting_point` has no entry for variable '{path}'. "
                    f"Received: starting_point with {len(references)} "
                    "entries"
                )
            w0 = _to_numpy(w0)
            if w0.shape != shape:
                raise ValueError(
                    f"`starting_point['{path}']` must have shape {shape}. "
                    f"Received: an array of shape {w0.shape}"
                )
        elif path in previous and previous[path][0] is not None:
            w0 = previous[path][0]
        elif path in previous_l2:
            w0 = previous_l2[path]
        else:
            w0 = np.array(variable.numpy())
        if not np.all(np.isfinite(w0)):
            raise ValueError(
                f"`starting_point['{path}']` must be finite. Received: an "
                "array with non-finite entries"
            )
        f = None
        if uses_fisher:
            if fisher_mapping is not None:
                f = _lookup(fisher_mapping, path, "fisher")
                if f is _MISSING:
                    raise ValueError(
                        f"`fisher` has no entry for variable '{path}'. "
                        f"Received: fisher with {len(fisher_mapping)} "
                        f"entries, e.g. {sorted(fisher_mapping)[:3]}"
                    )
                f = _to_numpy(f)
            elif path in previous and previous[path][1] is not None:
                f = previous[path][1]
            else:
                raise ValueError(
                    f"kind={kind!r} needs `fisher` (none is attached yet). "
                    "Received: fisher=None"
                )
            if f.shape != shape:
                raise ValueError(
                    f"`fisher['{path}']` must have shape {shape}. Received: "
                    f"an array of shape {f.shape}"
                )
            if not np.all(np.isfinite(f)):
                raise ValueError(
                    f"`fisher['{path}']` must be finite. Received: an array "
                    "with non-finite entries"
                )
            if np.any(f < 0):
                raise ValueError(
                    f"`fisher['{path}']` must be non-negative. Received: an "
                    f"array with minimum {f.min()}"
                )
            if fisher_clip is not None:
                f = np.minimum(f, fisher_clip)
            f = f + fisher_epsilon
        plan.append((layer, variable, w0, f))

    # Everything is checked: now replace the penalties.
    _detach(model)
    l2_references = {}
    for layer, variable, w0, f in plan:
        if kind == "l2":
            regularizer = regularizers.L2(alpha)
            l2_references[variable.path] = w0
        elif kind in ("l2_sp", "l2_sp_fisher"):
            regularizer = regularizers.L2SP(alpha, w0, fisher=f)
        elif kind == "l1_sp":
            regularizer = regularizers.L1SP(alpha, w0)
        else:
            regularizer = regularizers.GroupLassoSP(
                alpha, w0, fisher=f, group_axes=_group_axes(layer, variable)
            )
        _attach(layer, variable, regularizer)
    if l2_references:
        _L2_REFERENCES[model] = l2_references
    if beta > 0:
        for layer, variable in new:
            _attach(layer, variable, regularizers.L2(beta))
    _reset_compiled_functions(model)
    return model
