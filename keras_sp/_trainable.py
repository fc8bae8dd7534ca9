"""Making a change of `trainable` flags take effect in a compiled model.

Used by `keras_sp.units` (freezing depth units) and `keras_sp.linear_probe`
(LP-FT): both change flags, also from a callback in the middle of `fit`.
"""

import warnings
import weakref

from keras_sp import _keras_private

__all__ = ["apply_trainable_change"]


def _rebuilt_optimizer(optimizer, variables):
    """A new optimizer of the same config built for `variables`, with the
    state it had (step count, momenta...) carried over by variable name.

    Names that occur several times (a wrapper's and its inner optimizer's
    `iteration`) are matched in order of occurrence when the old and the
    new optimizer have as many of them.
    """
    rebuilt = optimizer.__class__.from_config(optimizer.get_config())
    rebuilt.build(variables)
    old, new = {}, {}
    for state, source in ((old, optimizer), (new, rebuilt)):
        for variable in source.variables:
            state.setdefault(variable.name, []).append(variable)
    for name, made in new.items():
        previous = old.get(name, [])
        if len(previous) != len(made):
            continue
        for variable, value in zip(made, previous, strict=True):
            if tuple(value.shape) == tuple(variable.shape):
                variable.assign(value.value)
    return rebuilt


# Models whose optimizer keras-sp had to replace, each warned about once.
_REPLACED = weakref.WeakSet()


def _warn_replaced(model, optimizer):
    if model in _REPLACED:
        return
    _REPLACED.add(model)
    warnings.warn(
        f"keras-sp cannot rebuild an optimizer of type "
        f"{type(optimizer).__name__} in place for the new set of trainable "
        f"variables of model {model.name!r}: `model.optimizer` is now a "
        "rebuilt copy with the same configuration and state (carried over "
        "by variable name), and the object passed to `compile` no longer "
        "trains the model. (Said once per model.)",
        stacklevel=4,
    )


def apply_trainable_change(model):
    """Makes a change of `trainable` flags take effect at the next step.

    For a compiled model whose optimizer is built: the optimizer is rebuilt
    for exactly `model.trainable_variables`, in their order, as every
    backend needs (JAX's stateless step takes one set of optimizer slots per
    trainable variable). The user's optimizer object is rebuilt in place:
    the step count and the slots (momenta, Adam's m and v...) of variables
    that stay trainable are kept exactly, the slots of newly trainable
    variables start at zero. Optimizers that wrap others
    (`LossScaleOptimizer`, `MultiOptimizer`) are replaced by a rebuilt copy
    instead, with a warning once per model (pointing at the caller of the
    function that called this one). The train function is rebuilt (it
    captured the list of trainable variables when it was traced).

    Call `_keras_private.sync_training_state(model)` before changing the
    flags: on JAX, `fit` keeps the variables' values outside them.
    """
    if not getattr(model, "compiled", False):
        return
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        variables = model.trainable_variables
        tracked = _keras_private.optimizer_variables(optimizer)
        if list(map(id, tracked)) != list(map(id, variables)):
            if _keras_private.rebuilds_in_place(optimizer):
                _keras_private.rebuild_optimizer(optimizer, variables)
            else:
                model.optimizer = _rebuilt_optimizer(optimizer, variables)
                _warn_replaced(model, optimizer)
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    _keras_private.acknowledge_trainable_state(model)
