"""Which variables of a model a penalty applies to, and how its arguments
(models or mappings of arrays, layers or layer names) are read."""

import keras
import numpy as np

from keras_sp import _keras_private

# Variable names Keras gives to convolution, depthwise and dense kernels.
KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def as_mapping(value, argument):
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


def to_numpy(value):
    """A NumPy copy of a Keras variable (its current value), or `value` as
    an array. On JAX the variable's backend value is converted (NumPy 2
    warns on the variable's own `__array__`); elsewhere `variable.numpy()`,
    which also reads distributed (mirrored) variables."""
    if isinstance(value, keras.Variable):
        if keras.backend.backend() == "jax":
            return np.array(value.value)
        return np.array(value.numpy())
    return np.asarray(value)


def layers_in(model):
    return [model] + _keras_private.all_layers(model)


def resolve_new_layers(model, new_layers, argument="new_layers"):
    """The layers of `model` that `new_layers` (layers or layer names)
    names; errors call the argument `argument`."""
    if isinstance(new_layers, (keras.layers.Layer, str)):
        new_layers = [new_layers]
    try:
        new_layers = list(new_layers)
    except TypeError:
        raise ValueError(
            f"`{argument}` must be a list of layers (or layer names) of the "
            f"model. Received: {argument}={new_layers!r}"
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
                    f"`{argument}[{index}]`: model '{model.name}' has {reason} "
                    f"layer named '{item}'. Received: {argument}={new_layers!r}"
                )
            item = matches[0]
        elif not isinstance(item, keras.layers.Layer):
            raise ValueError(
                f"`{argument}[{index}]` must be a layer or a layer name. "
                f"Received: {argument}[{index}]={item!r}"
            )
        elif not any(item is layer for layer in layers):
            raise ValueError(
                f"`{argument}[{index}]`: layer '{item.name}' is not in model "
                f"'{model.name}'. Received: {argument}="
                f"{[getattr(x, 'name', x) for x in new_layers]}"
            )
        resolved.append(item)
    return resolved


def penalized_variables(model, penalize):
    """Returns `[(layer, variable)]` for the variables `penalize` selects."""
    selected = []
    seen = set()
    for layer in layers_in(model):
        for variable in _keras_private.own_trainable_variables(layer):
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            if penalize == "kernels" and variable.name not in KERNEL_NAMES:
                continue
            selected.append((layer, variable))
    return selected


def group_axes(layer, variable):
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


def shared_variables(model, new_layers):
    """Every floating-point variable of the layers of `model` outside
    `new_layers` (resolved layers), trainable or not, once each, in layer
    order."""
    new_ids = set()
    for layer in new_layers:
        new_ids.update(id(x) for x in layers_in(layer))
    variables = []
    seen = set()
    for layer in layers_in(model):
        if id(layer) in new_ids:
            continue
        for variable in _keras_private.own_variables(layer):
            if id(variable) not in seen and keras.backend.is_float_dtype(
                variable.dtype
            ):
                seen.add(id(variable))
                variables.append(variable)
    return variables


def frozen_copy(value):
    """A read-only NumPy copy of a variable's current value (or an array):
    a starting point that later training cannot change."""
    value = np.array(to_numpy(value), copy=True)
    value.flags.writeable = False
    return value
