"""Placing the starting point w0 and the Fisher weights F on devices.

The -SP regularizers hold w0 and F in non-trainable `keras.Variable`s of
the regularizer, not of a layer. `keras_sp.regularize` creates them with
the names `"starting_point"` and `"fisher"` outside any layer's name scope,
so their `path` is just `"starting_point"` or `"fisher"`, the same for
every penalized weight. Under `keras.distribution.DataParallel` this does
not matter: every variable is replicated, w0 and F included. Under
`keras.distribution.ModelParallel`, whose `LayoutMap` places variables by
path, it does: a map written for the model's weights finds no layout for
them, and they are replicated on every device while the weight they belong
to is sharded. `add_penalty_layouts` gives each of them the path
`"<weight path>/starting_point"` (or `"/fisher"`) and the weight's layout.

See the guide "Scaling out" for the code of each engine (JAX data and
model parallelism, TensorFlow's `MirroredStrategy`).
"""

import keras

from keras_sp import _selection
from keras_sp import penalties
from keras_sp import regularizers

__all__ = [
    "add_penalty_layouts",
]

# The regularizer attribute holding each variable, and the variable's name.
_STATE = (("_starting_point", "starting_point"), ("_fisher", "fisher"))


def _keys(layout_map):
    # `key in layout_map` matches regexes (and is always True, since a
    # LayoutMap returns None for a missing key): compare exact keys only.
    return set(iter(layout_map))


def _recreate(variable, path, layout):
    """A copy of the non-trainable `variable` whose path is `path`, created
    with `layout` (placed at creation on the JAX backend)."""
    *scopes, name = path.split("/")
    kwargs = {}
    if keras.backend.backend() == "jax" and layout.device_mesh is not None:
        kwargs["layout"] = layout
    value = _selection.to_numpy(variable)

    def create(remaining):
        if not remaining:
            return keras.Variable(
                value,
                trainable=False,
                autocast=False,
                name=name,
                dtype=variable.dtype,
                **kwargs,
            )
        with keras.name_scope(remaining[0]):
            return create(remaining[1:])

    return create(scopes)


def add_penalty_layouts(layout_map, model):
    """Gives the starting point w0 and the Fisher weights F of every -SP
    penalty the layout of the weight they belong to.

    For each variable of `model` that carries a keras-sp starting-point
    penalty (`"l2_sp"`, `"l2_sp_fisher"`, `"l1_sp"`, `"group_lasso_sp"`,
    `"group_lasso_sp_fisher"`) and whose `path` has a layout in
    `layout_map`, this

    1. adds that layout to `layout_map` under the exact keys
       `"<path>/starting_point"` and, for the Fisher kinds,
       `"<path>/fisher"` (keys already present are left as they are);
    2. re-creates the regularizer's w0 (and F) variables with these paths,
       same values, and, on the JAX backend, that layout, so that they are
       sharded like the weight (the penalty w - w0 is then computed shard
       by shard, without gathering w0).

    Penalties whose weight has no layout in the map are left as they are
    (replicated). Call it after `keras_sp.regularize`, again after every
    later `regularize` (which creates new variables) and after loading a
    saved model (`keras.saving.load_model` restores w0 and F into new
    variables with the plain paths). A compiled model's train and test
    functions are rebuilt so the next step uses the new variables.

    Args:
        layout_map: the `keras.distribution.LayoutMap` of the
            `keras.distribution.ModelParallel` distribution the model is
            trained under. It is modified in place. A key it already holds
            for a w0 or F path is kept, and its layout used.
        model: a built `keras.Model` given to `keras_sp.regularize`.

    Returns:
        A dict `{w0 or F path: the weight's TensorLayout}` of the variables
        it placed.

    Example:

    >>> import keras, keras_sp
    >>> from keras_sp.distribution import add_penalty_layouts
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (1,), ["model"], devices=["cpu:0"])
    >>> layout_map = keras.distribution.LayoutMap(mesh)
    >>> layout_map["net/d/kernel"] = (None, "model")
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(2, name="d")], name="net")
    >>> _ = keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=())
    >>> placed = add_penalty_layouts(layout_map, model)
    >>> sorted(placed)
    ['net/d/kernel/starting_point']
    >>> layout_map["net/d/kernel/starting_point"].axes
    (None, 'model')
    """
    if not isinstance(layout_map, keras.distribution.LayoutMap):
        raise ValueError(
            "`layout_map` must be a keras.distribution.LayoutMap. "
            f"Received: layout_map={layout_map!r}"
        )
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model. Received: model={model!r}"
        )
    placed = {}
    for _, variable, regularizer in penalties.attached_penalties(model):
        if not isinstance(regularizer, regularizers._StartingPointPenalty):
            continue
        layout = layout_map[variable.path]
        if layout is None:
            continue
        for attribute, name in _STATE:
            state = getattr(regularizer, attribute)
            if state is None:
                continue
            path = f"{variable.path}/{name}"
            if path not in _keys(layout_map):
                layout_map[path] = layout
            # A layout the map already held for this path wins.
            path_layout = layout_map[path]
            setattr(regularizer, attribute, _recreate(state, path, path_layout))
            placed[path] = path_layout
    if placed:
        penalties.reset_compiled_functions(model)
    return placed
