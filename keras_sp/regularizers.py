"""The -SP penalty family of Li, Grandvalet & Davoine as Keras regularizers.

Every penalty follows the paper's convention: squared norms carry a factor
1/2 (as `tf.nn.l2_loss`), so `WeightDecay(alpha)` is alpha/2 ||w||^2, which is
half of `keras.regularizers.L2(alpha)`.

The starting point w0 and the Fisher weights F are held in non-trainable
variables of the regularizer. They are saved with the model's weights (in a
`.keras` or `.weights.h5` file, under the layer that holds the regularizer)
and never in `get_config()`, which holds plain JSON values only.

Weights in float16 or bfloat16 are penalized in float32 arithmetic (float16
would square small differences w - w0 to 0) and the penalty is returned in
the weights' dtype; a bfloat16 starting point is held in float32.

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018 (arXiv:1802.01483).
"""

import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_sp import _keras_private
from keras_sp import _selection
from keras_sp._checks import check_array
from keras_sp._checks import check_coefficient

__all__ = [
    "GroupLassoSP",
    "L1SP",
    "L2SP",
    "WeightDecay",
]

# Added inside the square root of each group norm so that its gradient is
# finite at w = w0, where fine-tuning starts (the authors added 1e-16 too).
GROUP_LASSO_EPSILON = 1e-16


def computation_dtype(dtype):
    """The dtype a penalty is computed in for weights of `dtype`.

    16-bit floats are widened to float32: float16 squares a difference
    w - w0 below 2^-12 to 0 (and rounds GROUP_LASSO_EPSILON to 0, which makes
    the group-lasso gradient at w0 NaN), and both lose precision when
    summing many terms. The penalty is returned in the weights' dtype.
    """
    if keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16"):
        return "float32"
    return dtype


def _check_proximal(proximal):
    if not isinstance(proximal, (bool, np.bool_)):
        raise ValueError(
            f"`proximal` must be True or False. Received: proximal={proximal!r}"
        )
    return bool(proximal)


def _constant_variable(value, name):
    if value.dtype == np.float64:
        # Not every backend holds float64 (JAX without x64): w0 and F are
        # kept in the float type Keras computes in.
        value = value.astype(keras.config.floatx())
    # A copy: some backends (JAX on CPU) would share the caller's buffer.
    value = np.array(value, copy=True)
    return keras.Variable(
        value, trainable=False, autocast=False, name=name, dtype=value.dtype
    )


@keras.saving.register_keras_serializable(package="keras_sp")
class WeightDecay(keras.regularizers.Regularizer):
    """Plain weight decay toward the origin (eq. 1), in the paper's convention.

    `Omega(w) = alpha / 2 * ||w||_2^2`

    This is the standard fine-tuning baseline ("L2" in the paper), and the
    penalty eq. 3 puts on the new layers (with coefficient beta). Note the
    factor 1/2: `WeightDecay(alpha)` is half of
    `keras.regularizers.L2(alpha)`, i.e. equal to
    `keras.regularizers.L2(alpha / 2)`.

    Args:
        alpha: non-negative float, the regularization strength.

    Example:

    >>> import numpy as np
    >>> float(WeightDecay(alpha=0.5)(np.ones((2, 2), "float32")))
    1.0

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eq. 1.
    """

    def __init__(self, alpha=0.01):
        self.alpha = check_coefficient("alpha", alpha)

    def __call__(self, x):
        x = ops.convert_to_tensor(x)
        dtype = computation_dtype(x.dtype)
        value = ops.cast(self.alpha / 2, dtype) * ops.sum(
            ops.square(ops.cast(x, dtype))
        )
        return ops.cast(value, x.dtype)

    def get_config(self):
        return {"alpha": self.alpha}

    def __repr__(self):
        return f"{type(self).__name__}(alpha={self.alpha})"


@keras.saving.register_keras_serializable(package="keras_sp")
class L2(WeightDecay):
    """Deprecated name of `WeightDecay`; kept to load models saved with it.

    Models saved before the rename hold the registered name `"keras_sp>L2"`;
    they load into this class, which warns and behaves as `WeightDecay`.
    New code uses `WeightDecay` (half of `keras.regularizers.L2(alpha)`).
    """

    def __init__(self, alpha=0.01):
        warnings.warn(
            "keras_sp.regularizers.L2 is deprecated: use "
            "keras_sp.regularizers.WeightDecay (alpha/2 ||w||^2, half of "
            "keras.regularizers.L2(alpha)).",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(alpha)


class _StartingPointPenalty(
    keras.regularizers.Regularizer, _keras_private.KerasSaveable
):
    """Base of the penalties that measure w against a starting point w0.

    Holds w0 (and, when `fisher_weighted`, the Fisher weights F) in
    non-trainable variables that are saved with the model's weights. A
    regularizer rebuilt from its config has neither until the weights are
    loaded; calling it before raises.
    """

    def __init__(
        self,
        alpha,
        starting_point=None,
        fisher=None,
        fisher_weighted=None,
    ):
        self.alpha = check_coefficient("alpha", alpha)
        if fisher_weighted is None:
            fisher_weighted = fisher is not None
        if fisher is not None and not fisher_weighted:
            raise ValueError(
                "`fisher` was given with `fisher_weighted=False`. "
                f"Received: fisher_weighted={fisher_weighted!r}"
            )
        self.fisher_weighted = bool(fisher_weighted)
        self._starting_point = None
        self._fisher = None
        if starting_point is not None:
            self._set_state(starting_point, fisher)
        elif fisher is not None:
            raise ValueError(
                "`fisher` needs a `starting_point` of the same shape. "
                "Received: starting_point=None"
            )

    def _set_state(self, starting_point, fisher):
        starting_point = check_array("starting_point", starting_point)
        if self.fisher_weighted:
            if fisher is None:
                raise ValueError(
                    f"{type(self).__name__} with fisher_weighted=True needs "
                    "`fisher`. Received: fisher=None"
                )
            fisher = check_array(
                "fisher",
                fisher,
                non_negative=True,
                shape=starting_point.shape,
            )
        self._starting_point = _constant_variable(
            starting_point, "starting_point"
        )
        if self.fisher_weighted:
            self._fisher = _constant_variable(
                fisher.astype(starting_point.dtype), "fisher"
            )

    @property
    def starting_point(self):
        """The starting point w0 as a NumPy array (None until restored)."""
        if self._starting_point is None:
            return None
        return _selection.to_numpy(self._starting_point)

    @property
    def reference(self):
        """The variable holding w0 (None until restored), for computations
        inside a traced step."""
        return self._starting_point

    @property
    def fisher(self):
        """The Fisher weights F as a NumPy array, or None."""
        if self._fisher is None:
            return None
        return _selection.to_numpy(self._fisher)

    def _difference(self, x):
        """Returns `(x, x - w0, F or None)`: x as a tensor, the others in
        the dtype the penalty is computed in (`computation_dtype`)."""
        if self._starting_point is None:
            raise ValueError(
                f"This {type(self).__name__} has no starting point: it was "
                "rebuilt from a config without its weights (as "
                "`keras.models.clone_model` and `from_config` do; they copy "
                "the architecture, not w0). Load the model with "
                "`keras.saving.load_model` (or `model.load_weights`), or "
                "attach the penalty to the copy again with "
                "`keras_sp.regularize(copy, kind, alpha=..., new_layers=..., "
                "starting_point=keras_sp.starting_point(original))`."
            )
        x = ops.convert_to_tensor(x)
        if tuple(x.shape) != tuple(self._starting_point.shape):
            raise ValueError(
                f"{type(self).__name__} has a starting point of shape "
                f"{tuple(self._starting_point.shape)} but was called on a "
                f"tensor of shape {tuple(x.shape)}."
            )
        dtype = computation_dtype(x.dtype)
        difference = ops.cast(x, dtype) - ops.cast(self._starting_point, dtype)
        fisher = None
        if self._fisher is not None:
            fisher = ops.cast(self._fisher, dtype)
        return x, difference, fisher

    def get_config(self):
        return {"alpha": self.alpha, "fisher_weighted": self.fisher_weighted}

    # Saving: w0 as "0" and F as "1", beside the layer's own weights.

    def _obj_type(self):
        return _keras_private.SAVEABLE_OBJ_TYPE

    def save_own_variables(self, store):
        if self._starting_point is None:
            return
        store["0"] = self.starting_point
        if self._fisher is not None:
            store["1"] = self.fisher

    def load_own_variables(self, store):
        keys = sorted(store.keys())
        if not keys:
            # The file holds no state for this regularizer (for instance
            # pretrained weights loaded into a regularized model): keep ours.
            return
        expected = ["0", "1"] if self.fisher_weighted else ["0"]
        if keys != expected:
            raise ValueError(
                f"Cannot restore {type(self).__name__}"
                f"(fisher_weighted={self.fisher_weighted}): the file holds "
                f"{len(keys)} arrays for it, expected {len(expected)}."
            )
        starting_point = np.asarray(store["0"])
        fisher = np.asarray(store["1"]) if self.fisher_weighted else None
        if self._starting_point is not None and tuple(
            starting_point.shape
        ) != tuple(self._starting_point.shape):
            raise ValueError(
                f"Cannot restore {type(self).__name__}: the file holds a "
                f"starting point of shape {starting_point.shape}, the "
                f"regularizer has {tuple(self._starting_point.shape)}."
            )
        if self._starting_point is None:
            self._set_state(starting_point, fisher)
            return
        self._starting_point.assign(starting_point)
        if fisher is not None:
            self._fisher.assign(fisher)

    def __reduce__(self):
        # KerasSaveable pickles whole models; a regularizer pickles (and
        # deep-copies) as its config plus its two arrays.
        return (
            _rebuild,
            (type(self), self.get_config(), self.starting_point, self.fisher),
        )

    def __repr__(self):
        shape = (
            None
            if self._starting_point is None
            else tuple(self._starting_point.shape)
        )
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({options}, shape={shape})"


def _rebuild(cls, config, starting_point, fisher):
    regularizer = cls.from_config(config)
    if starting_point is not None:
        regularizer._set_state(starting_point, fisher)
    return regularizer


@keras.saving.register_keras_serializable(package="keras_sp")
class L2SP(_StartingPointPenalty):
    """L2 penalty toward the starting point (eq. 2), optionally Fisher-weighted.

    `Omega(w) = alpha / 2 * ||w - w0||_2^2`  (eq. 2, the shared part of eq. 3)

    With Fisher weights F (the diagonal of the Fisher information on the
    source task), this is L2-SP-Fisher:

    `Omega(w) = alpha / 2 * sum_j F_j (w_j - w0_j)^2`  (eq. 4)

    With w0 = 0 and no Fisher weights, it equals `WeightDecay` (eq. 1).

    Args:
        alpha: non-negative float, the regularization strength.
        starting_point: array, the pretrained value w0 of the variable this
            regularizer is attached to (copied).
        fisher: optional non-negative array of the same shape, the Fisher
            weights F (copied).
        fisher_weighted: bool, whether F is used; defaults to
            `fisher is not None`. Set by `from_config`, where F comes later
            from the saved weights.

    Example:

    >>> import numpy as np
    >>> w0 = np.zeros((2, 2), "float32")
    >>> float(L2SP(alpha=0.5, starting_point=w0)(np.ones((2, 2), "float32")))
    1.0

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eqs. 2-4.
    """

    def __call__(self, x):
        x, difference, fisher = self._difference(x)
        squared = ops.square(difference)
        if fisher is not None:
            squared = fisher * squared
        value = ops.cast(self.alpha / 2, squared.dtype) * ops.sum(squared)
        return ops.cast(value, x.dtype)


@keras.saving.register_keras_serializable(package="keras_sp")
class L1SP(_StartingPointPenalty):
    """L1 penalty toward the starting point (eq. 5).

    `Omega(w) = alpha * ||w - w0||_1`

    It encourages single weights to stay exactly at their pretrained value.
    Its gradient at w_j = w0_j is taken as 0 (the subgradient of |.| at 0).
    Gradient steps on |.| oscillate around w0 and almost never land on it;
    with `proximal=True` the penalty gives no gradient and
    `keras_sp.proximal.Proximal` applies its proximal operator after each
    step instead (soft-thresholding toward w0), which sets weights exactly
    to w0. The value is still returned, so the loss logged is the whole
    objective.

    Args:
        alpha: non-negative float, the regularization strength.
        starting_point: array, the pretrained value w0 (copied).
        proximal: bool (default False). If True, the value carries no
            gradient (`stop_gradient`): train with
            `keras_sp.proximal.Proximal`, which applies the prox.

    Example:

    >>> import numpy as np
    >>> w0 = np.zeros((2, 2), "float32")
    >>> float(L1SP(alpha=0.5, starting_point=w0)(-np.ones((2, 2), "float32")))
    2.0

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eq. 5.
    """

    def __init__(
        self,
        alpha=0.01,
        starting_point=None,
        fisher_weighted=False,
        proximal=False,
    ):
        if fisher_weighted:
            raise ValueError(
                "L1SP has no Fisher-weighted form in the paper. "
                f"Received: fisher_weighted={fisher_weighted!r}"
            )
        self.proximal = _check_proximal(proximal)
        super().__init__(alpha, starting_point)

    def __call__(self, x):
        x, difference, _ = self._difference(x)
        # |d| as sign(d) * d with the sign held constant: the gradient is
        # sign(d), 0 at d = 0 on every backend (JAX's |.| has 1 there).
        absolute = ops.stop_gradient(ops.sign(difference)) * difference
        value = ops.cast(self.alpha, difference.dtype) * ops.sum(absolute)
        if self.proximal:
            value = ops.stop_gradient(value)
        return ops.cast(value, x.dtype)

    def get_config(self):
        config = super().get_config()
        config["proximal"] = self.proximal
        return config


@keras.saving.register_keras_serializable(package="keras_sp")
class GroupLassoSP(_StartingPointPenalty):
    """Group-Lasso toward the starting point (eq. 6), or its Fisher form (7).

    `Omega(w) = alpha * sum_g sqrt(p_g) * ||w_g - w0_g||_2`  (eq. 6)

    and with Fisher weights F (GL-SP-Fisher, eq. 7):

    `Omega(w) = alpha * sum_g sqrt(p_g) * sqrt(sum_{j in g} F_j (w_j - w0_j)^2)`

    A group g gathers the fan-in parameters of one output channel: the
    entries of the kernel that share an index on every axis not in
    `group_axes`; p_g is its size. `group_axes` defaults to every axis but the
    last, which is right for Conv2D kernels (h, w, d, c) and Dense kernels
    (d, c). For a DepthwiseConv2D kernel (h, w, d, m) pass `(0, 1)`.
    For a 1-D variable (a bias, BatchNormalization gamma or beta) the default
    makes each entry its own group (p_g = 1).

    Fine-tuning starts at w = w0, where the norm has no gradient. Each group
    norm is computed as `sqrt(s + eps) - sqrt(eps)` with
    `eps = GROUP_LASSO_EPSILON = 1e-16` (the authors added 1e-16 inside the
    root): the gradient is finite (zero at w0), the value is exactly 0 at w0,
    and it differs from the exact norm by less than 1e-8 per group.

    Gradient steps never set a whole group exactly to w0; with
    `proximal=True` (eq. 6 only) the penalty gives no gradient and
    `keras_sp.proximal.Proximal` applies its proximal operator (block
    soft-thresholding of each group toward w0_g) after each step instead.
    The value is still returned, so the loss logged is the whole objective.
    The Fisher form (eq. 7) has no closed-form prox and refuses it.

    Args:
        alpha: non-negative float, the regularization strength.
        starting_point: array, the pretrained value w0 (copied).
        fisher: optional non-negative array of the same shape (copied).
        group_axes: the axes summed within one group; defaults to all axes
            but the last.
        fisher_weighted: bool, whether F is used; defaults to
            `fisher is not None`.
        proximal: bool (default False). If True, the value carries no
            gradient (`stop_gradient`): train with
            `keras_sp.proximal.Proximal`, which applies the prox. Not
            allowed with Fisher weights.

    Example:

    >>> import numpy as np
    >>> w0 = np.zeros((4, 2), "float32")
    >>> w = np.ones((4, 2), "float32")
    >>> round(float(GroupLassoSP(alpha=1.0, starting_point=w0)(w)), 4)
    8.0

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eqs. 6-7.
    """

    def __init__(
        self,
        alpha=0.01,
        starting_point=None,
        fisher=None,
        group_axes=None,
        fisher_weighted=None,
        proximal=False,
    ):
        if group_axes is not None:
            group_axes = [int(axis) for axis in group_axes]
        self.group_axes = group_axes
        self.proximal = _check_proximal(proximal)
        weighted = (
            fisher is not None if fisher_weighted is None else fisher_weighted
        )
        if self.proximal and weighted:
            raise ValueError(
                "GroupLassoSP with Fisher weights (GL-SP-Fisher, eq. 7) has "
                "no closed-form proximal operator: use proximal=False (the "
                "penalty's gradient) or the unweighted group lasso (eq. 6). "
                f"Received: proximal=True, fisher_weighted={bool(weighted)}"
            )
        super().__init__(alpha, starting_point, fisher, fisher_weighted)
        if self._starting_point is not None:
            self.resolve_axes(len(self._starting_point.shape))

    def resolve_axes(self, rank):
        """The axes one group spans in a variable of `rank` axes."""
        if self.group_axes is None:
            return tuple(range(rank - 1))
        axes = []
        for axis in self.group_axes:
            if not -rank <= axis < rank:
                raise ValueError(
                    f"`group_axes` must be axes of a rank-{rank} variable. "
                    f"Received: group_axes={self.group_axes}"
                )
            axes.append(axis % rank)
        if len(set(axes)) != len(axes):
            raise ValueError(
                "`group_axes` must not repeat an axis. "
                f"Received: group_axes={self.group_axes}"
            )
        return tuple(sorted(axes))

    def __call__(self, x):
        x, difference, fisher = self._difference(x)
        axes = self.resolve_axes(len(x.shape))
        squared = ops.square(difference)
        if fisher is not None:
            squared = fisher * squared
        if axes:
            squared = ops.sum(squared, axis=axes)
        group_size = math.prod(x.shape[axis] for axis in axes)
        epsilon = GROUP_LASSO_EPSILON
        dtype = squared.dtype
        norms = ops.sqrt(squared + ops.cast(epsilon, dtype)) - ops.cast(
            math.sqrt(epsilon), dtype
        )
        coefficient = self.alpha * math.sqrt(group_size)
        value = ops.cast(coefficient, dtype) * ops.sum(norms)
        if self.proximal:
            value = ops.stop_gradient(value)
        return ops.cast(value, x.dtype)

    def get_config(self):
        config = super().get_config()
        config["group_axes"] = self.group_axes
        config["proximal"] = self.proximal
        return config
