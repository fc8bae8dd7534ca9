"""Proximal steps for the non-smooth -SP penalties (eqs. 5 and 6).

Gradient steps handle the L1-SP and Group-Lasso-SP penalties badly: their
(sub)gradient does not vanish near w0, so weights oscillate around their
pretrained value and almost never land on it. A proximal step splits the
objective: the optimizer steps on the data loss (and any smooth penalty),
then the proximal operator of the non-smooth penalty is applied to the
result, which sets weights (L1-SP) or whole output channels (GL-SP) exactly
to w0.

`Proximal` wraps any Keras optimizer. For each variable whose penalty was
attached with `proximal=True` (`keras_sp.regularize(..., proximal=True)`),
after the wrapped optimizer's update v, with learning rate eta:

- L1-SP, `Omega(w) = alpha * ||w - w0||_1` (eq. 5): soft-thresholding,
  `w = w0 + sign(v - w0) * max(|v - w0| - eta * alpha, 0)`;
- GL-SP, `Omega(w) = alpha * sum_g s_g * ||w_g - w0_g||_2` (eq. 6) with
  s_g = sqrt(p_g): block soft-thresholding of each group (output channel),
  `w_g = w0_g + (v_g - w0_g) * max(0, 1 - eta * alpha * s_g /
  ||v_g - w0_g||)`.

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, eqs. 5-6.
"""

import math
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_sp import _keras_private
from keras_sp import _selection
from keras_sp import penalties
from keras_sp import regularizers

__all__ = [
    "AtStartingPoint",
    "Proximal",
    "at_starting_point",
]

# Options of the wrapped optimizer the prox cannot follow: it would shrink
# the weights on steps where they do not move (gradient accumulation), or
# average and overwrite weights it has not seen (EMA).
_UNSUPPORTED_OPTIONS = ("gradient_accumulation_steps", "use_ema")


def _proximal_penalty(regularizer):
    return isinstance(
        regularizer, (regularizers.L1SP, regularizers.GroupLassoSP)
    ) and getattr(regularizer, "proximal", False)


@keras.saving.register_keras_serializable(package="keras_sp")
class Proximal(keras.optimizers.Optimizer):
    """Applies the prox of the L1-SP or GL-SP penalty after each step.

    The wrapped optimizer first updates every variable from the gradients
    (of the data loss and of the smooth penalties); then each variable
    whose regularizer is a proximal `L1SP` or `GroupLassoSP` (attached with
    `keras_sp.regularize(model, "l1_sp" or "group_lasso_sp", ...,
    proximal=True)`) is replaced by the proximal operator of its penalty at
    the updated value v. With eta the wrapped optimizer's learning rate at
    this step (a schedule included):

    L1-SP, `Omega(w) = alpha * ||w - w0||_1` (eq. 5):

    `w = w0 + sign(v - w0) * max(|v - w0| - eta * alpha, 0)`

    GL-SP, `Omega(w) = alpha * sum_g s_g ||w_g - w0_g||_2` (eq. 6), one
    group per output channel, s_g = sqrt(p_g):

    `w_g = w0_g + (v_g - w0_g) * max(0, 1 - eta * alpha * s_g /
    ||v_g - w0_g||)`

    A group with v_g = w0_g stays at w0_g. The prox is computed in float32
    (float64 for float64 variables), also for 16-bit variables, and cast
    back. Other variables are updated by the wrapped optimizer only. With
    plain SGD this is the proximal gradient method; with momentum or Adam,
    applying the prox after the base step is the usual heuristic (the
    momenta see no gradient of the penalty).

    The wrapped optimizer's state (step count, momenta) is saved with the
    model and restored on loading, so training resumes exactly.

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap, without
            `gradient_accumulation_steps` or `use_ema`.
        name: optional name.

    Example:

    >>> import keras, keras_sp
    >>> from keras_sp.proximal import Proximal
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.Dense(2, name="head")])
    >>> _ = keras_sp.regularize(model, "l1_sp", alpha=0.01, new_layers=["head"],
    ...                         proximal=True)
    >>> model.compile(Proximal(keras.optimizers.SGD(0.1, momentum=0.9)),
    ...               loss="mse")

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eqs. 5-6.
    """

    def __init__(self, optimizer, name=None, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "`optimizer` must be a keras.optimizers.Optimizer instance. "
                f"Received: optimizer of type {type(optimizer).__name__} "
                f"({optimizer!r})"
            )
        for option in _UNSUPPORTED_OPTIONS:
            if getattr(optimizer, option, None):
                raise ValueError(
                    f"Proximal cannot wrap an optimizer with `{option}`: the "
                    "prox must follow each update of the weights. Received: "
                    f"optimizer with {option}={getattr(optimizer, option)!r}"
                )
        if kwargs:
            raise ValueError(
                "Proximal takes only `optimizer` and `name`; set other "
                "options on the wrapped optimizer. Received: "
                f"{sorted(kwargs)}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.optimizer = optimizer

    @property
    def variables(self):
        # JAX's stateless step passes the values of these, in this order.
        return self._variables + self.optimizer.variables

    @property
    def learning_rate(self):
        return self.optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.optimizer.iterations

    def scale_loss(self, loss):
        return self.optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.optimizer.finalize_variable_values(var_list)

    def build(self, var_list):
        var_list = list(var_list)
        if not self.optimizer.built:
            # Checked here, before `fit` runs a step: on JAX an error in the
            # first step would leave the model's variables without values.
            _proximal_targets(var_list)
            self.optimizer.build(var_list)
        elif list(
            map(id, _keras_private.optimizer_variables(self.optimizer))
        ) != list(map(id, var_list)):
            # `keras_sp.freeze_first` and friends rebuild this optimizer for
            # new trainable variables: the wrapped one follows, its slots kept.
            _keras_private.rebuild_optimizer(self.optimizer, var_list)
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, "
                    "Proximal must already be built. Call "
                    "`optimizer.build(trainable_variables)` first."
                )
            variables = list(self._trainable_variables)
        else:
            trainable_variables = list(trainable_variables)
            variables = trainable_variables
        targets = _proximal_targets(variables)
        for variable, regularizer in targets:
            if regularizer.reference is None:
                raise ValueError(
                    f"The penalty on variable '{variable.path}' has no "
                    "starting point (it was rebuilt from a config without "
                    "its weights). Load the model with "
                    "`keras.saving.load_model` or attach the penalty again "
                    "with `keras_sp.regularize`."
                )
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        # The rate the wrapped optimizer steps with: read before its step
        # (a schedule reads the step count, which the step increments).
        learning_rate = ops.convert_to_tensor(self.optimizer.learning_rate)
        self.optimizer.apply(grads, trainable_variables)
        for variable, regularizer in targets:
            variable.assign(_prox(variable, regularizer, learning_rate))

    def save_own_variables(self, store):
        # The wrapped optimizer saves its own state as a child object.
        for i, variable in enumerate(self._variables):
            store[str(i)] = _selection.to_numpy(variable)

    def load_own_variables(self, store):
        if len(store.keys()) != len(self._variables):
            raise ValueError(
                f"Cannot restore Proximal '{self.name}': the file holds "
                f"{len(store.keys())} arrays for it, expected "
                f"{len(self._variables)}."
            )
        for i, variable in enumerate(self._variables):
            variable.assign(store[str(i)])

    def get_config(self):
        # Not super().get_config(): only `name` applies to the wrapper.
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.optimizer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(optimizer, **config)


def _proximal_targets(variables):
    """`(variable, regularizer)` for every variable with a proximal penalty;
    raises, before anything changes, if there is none."""
    targets = [
        (variable, variable.regularizer)
        for variable in variables
        if _proximal_penalty(getattr(variable, "regularizer", None))
    ]
    if not targets:
        names = [variable.path for variable in variables[:3]]
        raise ValueError(
            "Proximal found no variable with a proximal penalty among the "
            f"{len(variables)} variables it updates (e.g. {names}). Attach "
            "one before training with keras_sp.regularize(model, 'l1_sp' or "
            "'group_lasso_sp', alpha=..., new_layers=..., proximal=True), or "
            "train with the wrapped optimizer alone (to load a model saved "
            "in this state, pass compile=False to keras.saving.load_model)."
        )
    return targets


def _prox(variable, regularizer, learning_rate):
    """The proximal operator of `regularizer` (eq. 5 or 6) at the
    variable's current value, with step `learning_rate`."""
    dtype = regularizers.computation_dtype(variable.dtype)
    start = ops.cast(regularizer.reference, dtype)
    difference = ops.cast(variable, dtype) - start
    threshold = ops.cast(learning_rate, dtype) * ops.cast(
        regularizer.alpha, dtype
    )
    if isinstance(regularizer, regularizers.L1SP):
        shrunk = ops.sign(difference) * ops.maximum(
            ops.abs(difference) - threshold, ops.cast(0, dtype)
        )
    else:
        rank = len(variable.shape)
        axes = regularizer.resolve_axes(rank)
        group_size = math.prod(variable.shape[axis] for axis in axes)
        threshold = threshold * ops.cast(math.sqrt(group_size), dtype)
        if axes:
            norm = ops.sqrt(
                ops.sum(ops.square(difference), axis=axes, keepdims=True)
            )
        else:
            norm = ops.abs(difference)
        positive = norm > ops.cast(0, dtype)
        safe_norm = ops.where(positive, norm, ops.ones_like(norm))
        factor = ops.where(
            norm > threshold,
            ops.cast(1, dtype) - threshold / safe_norm,
            ops.zeros_like(norm),
        )
        shrunk = difference * factor
    return ops.cast(start + shrunk, variable.dtype)


class AtStartingPoint(NamedTuple):
    """What `at_starting_point` measures."""

    weights: float
    """Fraction of the penalized weights exactly equal to w0."""
    groups: float
    """Fraction of the groups (output channels) all of whose weights equal
    w0."""


def at_starting_point(model):
    """How much of the penalized part of `model` sits exactly at w0.

    Counts over every variable that carries a -SP penalty with a starting
    point (L2-SP, L1-SP, GL-SP, proximal or not). Groups are output
    channels, as in GL-SP (eq. 6): the entries of a kernel that share their
    last index (a depthwise kernel: its last two); each entry of a 1-D
    variable is its own group.

    Args:
        model: a `keras.Model` given to `keras_sp.regularize`.

    Returns:
        `AtStartingPoint(weights, groups)`: the fraction of penalized
        weights with w == w0, and the fraction of groups with w_g == w0_g.

    Example:

    >>> import keras, keras_sp
    >>> from keras_sp.proximal import at_starting_point
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> _ = keras_sp.regularize(model, "l1_sp", alpha=0.1, new_layers=())
    >>> at_starting_point(model)
    AtStartingPoint(weights=1.0, groups=1.0)

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eqs. 5-6.
    """
    _keras_private.sync_training_state(model)
    weights = equal_weights = groups = equal_groups = 0
    for layer, variable, regularizer in penalties.attached_penalties(model):
        start = getattr(regularizer, "starting_point", None)
        if start is None:
            continue
        equal = _selection.to_numpy(variable) == start
        rank = equal.ndim
        if isinstance(regularizer, regularizers.GroupLassoSP):
            axes = regularizer.resolve_axes(rank)
        else:
            axes = _selection.group_axes(layer, variable)
            axes = tuple(range(rank - 1)) if axes is None else axes
        grouped = np.all(equal, axis=axes) if axes else equal
        weights += equal.size
        equal_weights += int(np.sum(equal))
        groups += grouped.size
        equal_groups += int(np.sum(grouped))
    if not weights:
        raise ValueError(
            f"Model '{getattr(model, 'name', model)}' carries no -SP penalty "
            "with a starting point: call keras_sp.regularize first. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    return AtStartingPoint(
        weights=equal_weights / weights, groups=equal_groups / groups
    )
