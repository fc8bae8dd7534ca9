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

import warnings
import weakref

import numpy as np

from keras_sp import _keras_private
from keras_sp import _paths
from keras_sp import _selection
from keras_sp import regularizers
from keras_sp._checks import check_array
from keras_sp._checks import check_built_model
from keras_sp._checks import check_coefficient
from keras_sp._paths import PathDict

__all__ = [
    "PathDict",
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

KERNEL_NAMES = _selection.KERNEL_NAMES
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
# The penalties measured from a starting point w0.
_STARTING_POINT_PENALTIES = (
    regularizers.L2SP,
    regularizers.L1SP,
    regularizers.GroupLassoSP,
)
_OURS = (regularizers.WeightDecay, *_STARTING_POINT_PENALTIES)


class _Memory:
    """What `regularize` was given for one model, kept while the model lives.

    `starting_point` and `fisher` (the raw F, before `fisher_clip` and
    `fisher_epsilon`) are `{variable.path: np.ndarray}`; `settings` are the
    arguments of the last `regularize` call. They outlive `unregularize` and
    a switch to a kind that does not use them, so that a later `regularize`
    measures against the pretrained w0 and finds F again. `unpenalized` is
    the w0 `regularize` records for the shared variables it does not
    penalize, read by `keras_sp.interpolate` only (not by
    `starting_point`, so drift measures stay on the penalized variables).
    """

    def __init__(self):
        self.starting_point = {}
        self.unpenalized = {}
        self.fisher = {}
        self.settings = None


# Keyed by model, dropped with it.
_MEMORY = weakref.WeakKeyDictionary()


def memory_of(model):
    """The `_Memory` of `model` (made on first use)."""
    if model not in _MEMORY:
        _MEMORY[model] = _Memory()
    return _MEMORY[model]


def remembered_fisher(model):
    """The raw Fisher arrays `regularize` was given for `model` (and keeps
    after `unregularize`), `{variable.path: np.ndarray}`; empty if none."""
    memory = _MEMORY.get(model)
    return dict(memory.fisher) if memory is not None else {}


def attached_penalties(model):
    """The keras-sp penalties on `model`'s variables.

    Args:
        model: a built `keras.Model`.

    Returns:
        A list of `(layer, variable, regularizer)` for every variable that
        carries a keras-sp regularizer, in the order of `model.weights`.
    """
    owners = {}
    for layer in _selection.layers_in(model):
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
        A `PathDict` `{variable.path: np.ndarray}`: the w0 of every -SP
        penalty attached and, kept in memory while the model lives, the w0
        `regularize` recorded for `kind="l2"` or before `unregularize`, and
        those `keras_sp.record_starting_point` recorded.
        Empty when there is none. Its lookups accept a path Keras changed
        on save/load (`"backbone/c1/kernel"` finds `"c1/kernel"`).

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(2, name="d")], name="net")
    >>> _ = keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=())
    >>> w0 = keras_sp.starting_point(model)
    >>> list(w0)
    ['net/d/kernel']
    >>> bool((w0["net/d/kernel"] == model.layers[0].kernel).all())
    True
    >>> w0["d/kernel"].shape  # a '/'-aligned suffix finds it too
    (3, 2)
    """
    memory = _MEMORY.get(model)
    references = PathDict(memory.starting_point if memory else {})
    for _, variable, regularizer in attached_penalties(model):
        if isinstance(regularizer, _STARTING_POINT_PENALTIES):
            if regularizer.starting_point is not None:
                references[variable.path] = regularizer.starting_point
    return references


def attached_settings(model):
    """The arguments of the `regularize` call whose penalties `model`
    carries, or None.

    Known exactly for a call made in this process; for a model loaded from
    a file, `kind` and `alpha` are read off the attached penalties and the
    other entries are None.

    Args:
        model: a `keras.Model`.

    Returns:
        A dict with keys `kind`, `alpha`, `beta`, `penalize`,
        `fisher_epsilon`, `fisher_clip`, `proximal`, or None when no keras-sp
        penalty is attached.
    """
    attached = attached_penalties(model)
    if not attached:
        return None
    memory = _MEMORY.get(model)
    if memory is not None and memory.settings is not None:
        return dict(memory.settings)
    kinds = {_kind_of(regularizer) for _, _, regularizer in attached}
    shared = [r for _, _, r in attached if _kind_of(r) != "l2"]
    kind = _kind_of(shared[0]) if shared else "l2"
    alphas = (
        {r.alpha for r in shared}
        if shared
        else {r.alpha for _, _, r in attached}
    )
    return {
        "kind": kind if len(kinds - {"l2"}) <= 1 else None,
        "alpha": alphas.pop() if len(alphas) == 1 else None,
        "beta": None,
        "penalize": None,
        "fisher_epsilon": None,
        "fisher_clip": None,
        "proximal": None,
    }


def _kind_of(regularizer):
    if isinstance(regularizer, regularizers.L2SP):
        return "l2_sp_fisher" if regularizer.fisher_weighted else "l2_sp"
    if isinstance(regularizer, regularizers.L1SP):
        return "l1_sp"
    if isinstance(regularizer, regularizers.GroupLassoSP):
        if regularizer.fisher_weighted:
            return "group_lasso_sp_fisher"
        return "group_lasso_sp"
    return "l2"


def remember_attached(model):
    """Copies the w0 and F attached to `model` into its memory."""
    memory = memory_of(model)
    for _, variable, regularizer in attached_penalties(model):
        if isinstance(regularizer, _STARTING_POINT_PENALTIES):
            if regularizer.starting_point is None:
                continue
            memory.starting_point[variable.path] = regularizer.starting_point
            if regularizer.fisher is not None:
                memory.fisher.setdefault(variable.path, regularizer.fisher)


def _detach(model):
    for layer in _selection.layers_in(model):
        for variable in _keras_private.own_variables(layer):
            if isinstance(variable.regularizer, _OURS):
                variable.regularizer = None
        for attributes in REGULARIZER_ATTRIBUTES.values():
            for attribute in attributes:
                if isinstance(getattr(layer, attribute, None), _OURS):
                    setattr(layer, attribute, None)


def _attach(layer, variable, regularizer):
    variable.regularizer = regularizer
    for attribute in REGULARIZER_ATTRIBUTES.get(variable.name, ()):
        if hasattr(layer, attribute):
            current = getattr(layer, attribute)
            if current is None or isinstance(current, _OURS):
                setattr(layer, attribute, regularizer)
            break


def reset_compiled_functions(model):
    """Rebuilds a compiled model's train and test functions: a traced step
    holds the penalties it was traced with."""
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    if getattr(model, "test_function", None) is not None:
        model.make_test_function(force=True)


def unregularize(model):
    """Removes every penalty `regularize` attached to `model`.

    Regularizers that keras-sp did not attach are left as they are. The
    starting point and Fisher weights are remembered while the model lives
    (in this process), so a later `regularize` measures against the same
    pretrained w0 (pass `starting_point=model` to restart from the current
    weights instead). The model's config then names no keras-sp object:
    saved after `unregularize`, it loads with plain Keras, without keras-sp
    installed.

    Args:
        model: a `keras.Model`.

    Returns:
        The model.
    """
    remember_attached(model)
    _detach(model)
    reset_compiled_functions(model)
    return model


def _unpenalized_starting_point(model, new_layers, plan, references):
    """`{path: w0}` for the variables outside `new_layers` that `regularize`
    does not penalize (biases, BatchNormalization gamma, beta and moving
    statistics): the entry of `references` (an explicit `starting_point`)
    when it has one, else the current value if no w0 is recorded yet, so
    that `keras_sp.interpolate` finds a w0 for every pretrained variable."""
    penalized = {id(variable) for _, variable, _, _ in plan}
    memory = memory_of(model)
    recorded = PathDict({**memory.unpenalized, **memory.starting_point})
    entries = {}
    for variable in _selection.shared_variables(model, new_layers):
        path = variable.path
        if id(variable) in penalized:
            continue
        value = _paths.MISSING
        if references is not None:
            value = _paths.lookup(references, path, "starting_point")
        if value is not _paths.MISSING:
            value = _selection.frozen_copy(value)
            check_array(
                f"starting_point['{path}']", value, shape=variable.shape
            )
            entries[path] = value
        elif path not in recorded:
            entries[path] = _selection.frozen_copy(variable)
    return entries


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. Received: "
            f"{name}={value!r}"
        )


def _entry(mapping, path, argument):
    """The NumPy array of `mapping` (the `argument` of `regularize`) for
    variable `path`, matched as `_paths.lookup` does."""
    value = _paths.lookup(mapping, path, argument)
    if value is _paths.MISSING:
        raise ValueError(
            f"`{argument}` has no entry for variable '{path}'. Received: "
            f"{argument} with {len(mapping)} entries, e.g. "
            f"{sorted(mapping, key=str)[:3]}"
        )
    return _selection.to_numpy(value)


def regularize(
    model,
    kind,
    *,
    alpha,
    beta=0.0,
    new_layers=None,
    starting_point=None,
    fisher=None,
    penalize="kernels",
    fisher_epsilon=0.0,
    fisher_clip=None,
    proximal=False,
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
    twice) and keeps the starting point w0 already recorded for the model
    unless `starting_point` is given: the first call's w0 stays the
    reference through later calls, a switch of kind, and `unregularize`
    (kept in memory while the model lives). The Fisher weights are kept the
    same way: `l2_sp_fisher` -> `l2_sp` -> `l2_sp_fisher` finds F again.
    `unregularize` removes the penalties. A compiled model's train and test
    functions are rebuilt so the next step uses the new penalties.

    The variables of the shared part that get no penalty (biases, and
    BatchNormalization gamma, beta and moving statistics with
    `penalize="kernels"`) get a w0 recorded in memory too, when they have
    none yet (from `starting_point` when it has their entry), so that
    `keras_sp.interpolate` moves the whole shared part toward w0;
    `keras_sp.starting_point` does not list them.

    Args:
        model: a built `keras.Model`.
        kind: one of `"l2"`, `"l2_sp"`, `"l2_sp_fisher"`, `"l1_sp"`,
            `"group_lasso_sp"`, `"group_lasso_sp_fisher"`.
        alpha: non-negative float, the strength on the shared part.
        beta: non-negative float, the strength of L2 on the new layers.
        new_layers: layers (or layer names) of `model` that are new for the
            target task, such as the new classifier; they get `beta`, not
            the -SP penalty. Omitting it (None) treats every layer as
            pretrained and, for the -SP kinds, warns: a new, randomly
            initialised head would be pulled toward its own initialisation.
            Pass `new_layers=()` when the model has no new layer.
        starting_point: w0. `None` keeps the starting point recorded by a
            previous call on this model (attached, or remembered after
            `unregularize` or a switch to `"l2"`), and otherwise takes a
            frozen copy of the model's current weights. A `keras.Model`
            (the pretrained model, or `model` itself to restart from its
            current weights) or a mapping `{variable.path: array}` gives it
            explicitly.
        fisher: for the Fisher kinds, `{variable.path: array}` as
            `keras_sp.fisher.diagonal_fisher` returns for the source model.
            Matched to the shared variables by path, also when the source
            model is nested in the target (a '/'-aligned path suffix).
            `None` keeps the Fisher a previous call was given (the raw F;
            `fisher_clip` and `fisher_epsilon` apply anew).
        penalize: `"kernels"` (default, as the authors' code: convolution,
            depthwise and dense kernels only) or `"all"` (every trainable
            variable, biases and BatchNormalization gamma/beta included).
        fisher_epsilon: non-negative float added to F (default 0, the
            paper's raw F; the authors' code offered F + epsilon).
        fisher_clip: optional positive float; F is clipped at this maximum
            before `fisher_epsilon` is added (default: no clipping).
        proximal: bool (default False), for `"l1_sp"` and
            `"group_lasso_sp"` only: the penalty stays in the loss but
            gives no gradient, and `keras_sp.proximal.Proximal` applies its
            proximal operator after each step, which sets weights (L1-SP)
            or whole output channels (GL-SP) exactly to w0.

    Returns:
        The model.

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.Dense(2, name="head")])
    >>> model = keras_sp.regularize(model, "l2_sp", alpha=0.1, beta=0.01,
    ...                             new_layers=["head"])
    >>> penalty = keras.ops.convert_to_numpy(sum(model.losses))
    >>> bool(penalty > 0)  # beta/2 ||w_head||^2; w = w0 elsewhere
    True

    Reference:
        Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer
        Learning with Convolutional Networks". ICML 2018, eqs. 1-7.
    """
    _check_choice("kind", kind, KINDS)
    alpha = check_coefficient("alpha", alpha)
    beta = check_coefficient("beta", beta)
    _check_choice("penalize", penalize, PENALIZE)
    fisher_epsilon = check_coefficient("fisher_epsilon", fisher_epsilon)
    if fisher_clip is not None:
        fisher_clip = check_coefficient("fisher_clip", fisher_clip)
        if fisher_clip == 0:
            raise ValueError(
                "`fisher_clip` must be positive (or None for no clipping). "
                f"Received: fisher_clip={fisher_clip!r}"
            )
    check_built_model(model)
    if not isinstance(proximal, (bool, np.bool_)):
        raise ValueError(
            f"`proximal` must be True or False. Received: proximal={proximal!r}"
        )
    if proximal and kind not in ("l1_sp", "group_lasso_sp"):
        raise ValueError(
            "`proximal=True` is only for kind 'l1_sp' (eq. 5) or "
            "'group_lasso_sp' (eq. 6), whose proximal operators have a closed "
            f"form. Received: kind={kind!r}, proximal={proximal!r}"
        )
    proximal = bool(proximal)
    uses_fisher = kind in FISHER_KINDS
    if fisher is not None and not uses_fisher:
        raise ValueError(
            f"`fisher` is only used by the kinds {list(FISHER_KINDS)}. "
            f"Received: kind={kind!r} with a fisher"
        )
    _paths.check_unique_paths(model)
    if new_layers is None:
        if kind != "l2":
            warnings.warn(
                f"regularize(kind={kind!r}) was called without `new_layers`: "
                "every layer is treated as pretrained, so a new classifier "
                "is pulled toward its random initialisation with `alpha`. "
                "Pass the new layers (e.g. new_layers=['head']), or "
                "new_layers=() if the model has none.",
                UserWarning,
                stacklevel=2,
            )
        new_layers = ()
    new_layers = _selection.resolve_new_layers(model, new_layers)

    new_ids = set()
    for layer in new_layers:
        new_ids.update(id(x) for x in _selection.layers_in(layer))
    selected = _selection.penalized_variables(model, penalize)
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

    # The starting point and Fisher recorded for the model are kept by
    # default: the attached ones, then those remembered in memory.
    remember_attached(model)
    memory = memory_of(model)
    previous_w0 = PathDict(memory.starting_point)
    previous_fisher = PathDict(memory.fisher)

    references = None
    if starting_point is not None:
        references = _selection.as_mapping(starting_point, "starting_point")
    fisher_mapping = None
    if fisher is not None:
        fisher_mapping = _selection.as_mapping(fisher, "fisher")

    plan = []
    for layer, variable in shared:
        path = variable.path
        shape = tuple(variable.shape)
        if references is not None:
            w0 = _entry(references, path, "starting_point")
        elif path in previous_w0:
            w0 = previous_w0[path]
        else:
            w0 = _selection.to_numpy(variable)
        # Checked only: w0 keeps its dtype.
        check_array(f"starting_point['{path}']", w0, shape=shape)
        f = None
        if uses_fisher:
            if fisher_mapping is not None:
                f = _entry(fisher_mapping, path, "fisher")
            elif path in previous_fisher:
                f = previous_fisher[path]
            else:
                raise ValueError(
                    f"kind={kind!r} needs `fisher` (none is attached yet). "
                    "Received: fisher=None"
                )
            check_array(f"fisher['{path}']", f, non_negative=True, shape=shape)
        plan.append((layer, variable, w0, f))

    unpenalized = _unpenalized_starting_point(
        model, new_layers, plan, references
    )

    # Everything is checked: now replace the penalties.
    _detach(model)
    memory.unpenalized.update(unpenalized)
    for layer, variable, w0, f in plan:
        memory.starting_point[variable.path] = w0
        if f is not None:
            memory.fisher[variable.path] = f
            if fisher_clip is not None:
                f = np.minimum(f, fisher_clip)
            f = f + fisher_epsilon
        if kind == "l2":
            regularizer = regularizers.WeightDecay(alpha)
        elif kind in ("l2_sp", "l2_sp_fisher"):
            regularizer = regularizers.L2SP(alpha, w0, fisher=f)
        elif kind == "l1_sp":
            regularizer = regularizers.L1SP(alpha, w0, proximal=proximal)
        else:
            regularizer = regularizers.GroupLassoSP(
                alpha,
                w0,
                fisher=f,
                group_axes=_selection.group_axes(layer, variable),
                proximal=proximal,
            )
        _attach(layer, variable, regularizer)
    memory.settings = {
        "kind": kind,
        "alpha": alpha,
        "beta": beta,
        "penalize": penalize,
        "fisher_epsilon": fisher_epsilon,
        "fisher_clip": fisher_clip,
        "proximal": proximal,
    }
    if beta > 0:
        for layer, variable in new:
            _attach(layer, variable, regularizers.WeightDecay(beta))
    reset_compiled_functions(model)
    return model
