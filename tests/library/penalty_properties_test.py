"""Property tests of the -SP penalty family (eqs. 1-7 of Li et al., 2018).

Shapes (rank 1-4), weight dtypes (float16, bfloat16, float32), strengths,
starting points, Fisher weights and layer types are drawn at random; every
number is checked against the NumPy float64 closed forms of
`penalty_reference.py`, written from the paper's equations, or against a
central finite difference of them. Weights are drawn on a grid of
power-of-two multiples of 1/16 that every one of the three dtypes holds
exactly, so only the arithmetic of the penalty is measured, and differences
w - w0 go down to 2^-16 (fine-tuning moves pretrained weights by such
amounts, and float16 squares them below its smallest normal). The file
runs on the TensorFlow, JAX and torch backends.

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, eqs. 1-7.
"""

import math

import keras
import numpy as np
import penalty_reference
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from keras import ops

from keras_sp import penalties
from keras_sp import regularizers

DTYPES = ("float16", "bfloat16", "float32")
# The spacing of the numbers in [1, 2): twice the unit roundoff.
EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23}
# The smallest positive number, the spacing of results next to 0.
TINY = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149}
KINDS = penalties.KINDS
FISHER_KINDS = ("l2_sp_fisher", "group_lasso_sp_fisher")
PROPERTY = settings(
    max_examples=60, deadline=None, derandomize=True, database=None
)
LAYER_PROPERTY = settings(
    max_examples=12, deadline=None, derandomize=True, database=None
)


def _rtol(dtype, size):
    """Relative error allowed for a sum of `size` non-negative terms, each
    rounded in `dtype` (pairwise summation: about log2(size) roundings)."""
    return 4 * EPSILON[dtype] * (2 + math.log2(max(size, 1)))


def _group_epsilon_bound(alpha, shape, axes):
    """|computed - exact| of eq. 6/7 due to GROUP_LASSO_EPSILON: at most
    sqrt(eps) per group, times alpha sqrt(p_g)."""
    group_size = math.prod(shape[axis] for axis in axes)
    groups = math.prod(shape) // group_size
    return (
        alpha
        * math.sqrt(group_size)
        * groups
        * math.sqrt(regularizers.GROUP_LASSO_EPSILON)
    )


def _tensor(array, dtype):
    """A backend tensor of `dtype` holding `array` (exactly, on our grid)."""
    return ops.cast(ops.convert_to_tensor(np.asarray(array, "float32")), dtype)


def _float64(tensor):
    return ops.convert_to_numpy(ops.cast(tensor, "float32")).astype("float64")


def _gradient(function, x):
    """The gradient of the scalar `function` at the tensor `x`, computed by
    the active backend's automatic differentiation."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            value = function(x)
        return tape.gradient(value, x)
    if backend == "jax":
        import jax

        return jax.grad(function)(x)
    if backend == "torch":
        import torch

        x = x.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(function(x), x)
        return gradient
    raise NotImplementedError(f"No gradient helper for backend {backend!r}")


def _central_difference(function, w, step):
    """(f(w + step e_j) - f(w - step e_j)) / (2 step) for every entry j."""
    gradient = np.zeros_like(w)
    for index in np.ndindex(w.shape):
        plus = w.copy()
        minus = w.copy()
        plus[index] += step
        minus[index] -= step
        gradient[index] = (function(plus) - function(minus)) / (2 * step)
    return gradient


def _grid(shape, low=-32, high=32):
    """Integer arrays; k * 2^s / 16 with |k| <= 64 is exact in every dtype."""
    return arrays(np.int64, shape, elements=st.integers(low, high))


@st.composite
def penalty_cases(draw, kinds=KINDS, nonzero=False, singleton_groups=False):
    """A penalty kind, dtype, shape, alpha, w0, w = w0 + d, F and groups.

    `nonzero`: every d_j != 0 and F_j > 0 (differentiable everywhere).
    `singleton_groups`: group axes whose sizes are all 1.
    """
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(DTYPES))
    rank = draw(st.integers(1, 4))
    shape = list(
        draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    )
    if singleton_groups:
        axes = draw(st.lists(st.integers(0, rank - 1), unique=True))
        for axis in axes:
            shape[axis] = 1
        group_axes = tuple(sorted(axes))
    else:
        group_axes = draw(
            st.none() | st.lists(st.integers(0, rank - 1), unique=True)
        )
    shape = tuple(shape)
    step = 2.0 ** draw(st.integers(-12, 0)) / 16
    w0 = draw(_grid(shape)) * step
    differences = _grid(shape)
    if nonzero:
        differences = arrays(
            np.int64, shape, elements=st.integers(-32, 32).filter(bool)
        )
    w = w0 + draw(differences) * step
    fisher = None
    if kind in FISHER_KINDS:
        fisher = draw(_grid(shape, low=1 if nonzero else 0, high=16)) / 8
    alpha = draw(st.floats(1e-3, 1.0))
    if group_axes is None:
        reference_axes = tuple(range(rank - 1))
    else:
        reference_axes = tuple(sorted(group_axes))
    return {
        "kind": kind,
        "dtype": dtype,
        "shape": shape,
        "alpha": alpha,
        "w0": w0,
        "w": w,
        "fisher": fisher,
        "group_axes": group_axes,
        "reference_axes": reference_axes,
    }


def _penalty(case, alpha=None, fisher="case"):
    """The regularizer of `case`; w0 is given in the weights' dtype, as
    `regularize` gives it (the model's own weights)."""
    kind = case["kind"]
    alpha = case["alpha"] if alpha is None else alpha
    if kind not in FISHER_KINDS:
        fisher = None
    elif isinstance(fisher, str):
        fisher = case["fisher"]
    w0 = np.asarray(
        keras.ops.convert_to_numpy(_tensor(case["w0"], case["dtype"]))
    )
    if kind == "l2":
        return regularizers.WeightDecay(alpha)
    if kind in ("l2_sp", "l2_sp_fisher"):
        return regularizers.L2SP(alpha, w0, fisher=fisher)
    if kind == "l1_sp":
        return regularizers.L1SP(alpha, w0)
    return regularizers.GroupLassoSP(
        alpha, w0, fisher=fisher, group_axes=case["group_axes"]
    )


def _reference(case, w=None):
    """Eqs. 1-7 in float64 at `w` (default: the case's w)."""
    return penalty_reference.shared_penalty(
        case["kind"],
        case["alpha"],
        case["w"] if w is None else w,
        case["w0"],
        case["fisher"],
        case["reference_axes"],
    )


def _value(penalty, w, dtype):
    value = penalty(_tensor(w, dtype))
    assert keras.backend.standardize_dtype(value.dtype) == dtype
    return float(_float64(value))


@PROPERTY
@given(penalty_cases())
def test_non_negative_and_zero_at_the_starting_point(case):
    """Omega >= 0, and Omega = 0 at w = w0 (at w = 0 for L2, eq. 1):
    exactly for eqs. 1-5, within GROUP_LASSO_EPSILON for eqs. 6-7."""
    penalty = _penalty(case)
    dtype = case["dtype"]
    assert _value(penalty, case["w"], dtype) >= 0
    at_start = _value(
        penalty,
        np.zeros(case["shape"]) if case["kind"] == "l2" else case["w0"],
        dtype,
    )
    if case["kind"].startswith("group_lasso"):
        assert (
            0
            <= at_start
            <= _group_epsilon_bound(
                case["alpha"], case["shape"], case["reference_axes"]
            )
        )
    else:
        assert at_start == 0


@PROPERTY
@given(penalty_cases(), st.floats(0.25, 4.0))
def test_linear_in_alpha(case, factor):
    """Omega_{c alpha}(w) = c Omega_alpha(w), within the rounding of the
    coefficient and of the result in the weights' dtype."""
    dtype = case["dtype"]
    value = _value(_penalty(case), case["w"], dtype)
    scaled = _value(
        _penalty(case, alpha=factor * case["alpha"]), case["w"], dtype
    )
    np.testing.assert_allclose(
        scaled, factor * value, rtol=4 * EPSILON[dtype], atol=4 * TINY[dtype]
    )


@PROPERTY
@given(penalty_cases())
def test_value_matches_the_float64_closed_form(case):
    """The value equals eqs. 1-7 evaluated in float64 NumPy."""
    dtype = case["dtype"]
    value = _value(_penalty(case), case["w"], dtype)
    expected = _reference(case)
    atol = 4 * TINY[dtype]
    if case["kind"].startswith("group_lasso"):
        atol += _group_epsilon_bound(
            case["alpha"], case["shape"], case["reference_axes"]
        )
    rtol = _rtol(dtype, math.prod(case["shape"]))
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=atol)


@PROPERTY
@given(penalty_cases(kinds=("group_lasso_sp",), singleton_groups=True))
def test_group_lasso_with_singleton_groups_is_l1_sp(case):
    """Eq. 6 with groups of one entry (p_g = 1) is eq. 5:
    alpha sum_j sqrt(d_j^2) = alpha sum_j |d_j|."""
    dtype = case["dtype"]
    group_lasso = _value(_penalty(case), case["w"], dtype)
    l1 = _value(_penalty(dict(case, kind="l1_sp")), case["w"], dtype)
    size = math.prod(case["shape"])
    atol = 4 * TINY[dtype] + _group_epsilon_bound(
        case["alpha"], case["shape"], case["reference_axes"]
    )
    np.testing.assert_allclose(
        group_lasso, l1, rtol=_rtol(dtype, size), atol=atol
    )


@PROPERTY
@given(penalty_cases(kinds=FISHER_KINDS))
def test_fisher_kinds_with_unit_fisher_are_the_plain_kinds(case):
    """Eq. 4 with F = 1 is eq. 2, and eq. 7 with F = 1 is eq. 6: same
    value and same gradient, bit for bit."""
    dtype = case["dtype"]
    ones = np.ones(case["shape"])
    weighted = _penalty(case, fisher=ones)
    plain = _penalty(dict(case, kind=case["kind"][: -len("_fisher")]))
    assert plain.fisher_weighted is False
    x = _tensor(case["w"], dtype)
    np.testing.assert_array_equal(_float64(weighted(x)), _float64(plain(x)))
    np.testing.assert_array_equal(
        _float64(_gradient(weighted, x)), _float64(_gradient(plain, x))
    )


@PROPERTY
@given(penalty_cases(nonzero=True))
def test_gradient_matches_a_central_difference_of_the_closed_form(case):
    """Away from the kinks (every w_j != w0_j, so every group norm > 0),
    the gradient equals a central finite difference of eqs. 1-7 in
    float64, with a step far below the distance to any kink."""
    dtype = case["dtype"]
    gradient = _float64(_gradient(_penalty(case), _tensor(case["w"], dtype)))
    smallest = np.min(np.abs(case["w"] - case["w0"]))
    expected = _central_difference(
        lambda w: _reference(case, w=w), case["w"], step=1e-4 * smallest
    )
    rtol = _rtol(dtype, math.prod(case["shape"]))
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(
        gradient, expected, rtol=rtol, atol=rtol * scale + 4 * TINY[dtype]
    )


@PROPERTY
@given(penalty_cases(kinds=("group_lasso_sp", "group_lasso_sp_fisher")))
def test_group_lasso_gradient_is_zero_at_the_starting_point(case):
    """At w = w0, where fine-tuning starts, the smoothed group norm of
    eqs. 6-7 has a finite gradient, and it is 0."""
    gradient = _float64(
        _gradient(_penalty(case), _tensor(case["w0"], case["dtype"]))
    )
    np.testing.assert_array_equal(gradient, np.zeros(case["shape"]))


def _layer(draw, layer_type, dtype):
    """A tiny layer of `layer_type` and the input shape it is built on."""
    width = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 3))
    size = draw(st.integers(1, 3))
    if layer_type == "Dense":
        return keras.layers.Dense(width, dtype=dtype), (channels,)
    if layer_type == "Conv2D":
        return (
            keras.layers.Conv2D(width, size, dtype=dtype),
            (3, 3, channels),
        )
    if layer_type == "DepthwiseConv2D":
        return (
            keras.layers.DepthwiseConv2D(
                size, depth_multiplier=width, dtype=dtype
            ),
            (3, 3, channels),
        )
    if layer_type == "Conv1D":
        return keras.layers.Conv1D(width, size, dtype=dtype), (3, channels)
    return keras.layers.BatchNormalization(dtype=dtype), (channels,)


@LAYER_PROPERTY
@given(
    st.sampled_from(
        ("Dense", "Conv2D", "DepthwiseConv2D", "Conv1D", "BatchNormalization")
    ),
    st.sampled_from(KINDS),
    st.sampled_from(DTYPES),
    st.booleans(),
    st.data(),
)
def test_regularize_on_each_layer_type_matches_the_closed_form(
    layer_type, kind, dtype, kernels_only, data
):
    """`regularize` on a one-layer model whose weights are in `dtype`: the
    penalty is 0 (within GROUP_LASSO_EPSILON) at the starting point, and
    after moving the weights `model.losses` sums eqs. 1-7 over the
    penalized variables, with the groups of a depthwise kernel being its
    (channel, multiplier) pairs. BatchNormalization gamma and beta are
    penalized with `penalize="all"`."""
    layer, input_shape = _layer(data.draw, layer_type, dtype)
    model = keras.Sequential([keras.Input(input_shape), layer])
    penalize = "all"
    if kernels_only and layer_type != "BatchNormalization":
        penalize = "kernels"
    step = 2.0 ** data.draw(st.integers(-12, 0)) / 16
    alpha = data.draw(st.floats(1e-3, 1.0))
    chosen = []
    for variable in model.trainable_weights:
        shape = tuple(variable.shape)
        w0 = data.draw(_grid(shape)) * step
        d = data.draw(_grid(shape)) * step
        fisher = data.draw(_grid(shape, low=0, high=16)) / 8
        variable.assign(w0.astype("float32"))
        kernel = variable.name in penalty_reference.KERNEL_NAMES
        if penalize == "all" or kernel:
            axes = penalty_reference.group_axes(
                variable.name, layer_type, len(shape)
            )
            chosen.append((variable, w0, d, fisher, axes))
    fisher = {variable.path: f for variable, _, _, f, _ in chosen}
    penalties.regularize(
        model,
        kind,
        alpha=alpha,
        new_layers=(),
        penalize=penalize,
        fisher=fisher if kind in FISHER_KINDS else None,
    )
    assert len(model.losses) == len(chosen)

    at_start = sum(float(_float64(loss)) for loss in model.losses)
    if kind == "l2":
        expected = sum(
            penalty_reference.shared_penalty(kind, alpha, w0, w0, None, ())
            for _, w0, _, _, _ in chosen
        )
        np.testing.assert_allclose(
            at_start, expected, rtol=_rtol(dtype, 64), atol=TINY[dtype]
        )
    elif kind.startswith("group_lasso"):
        bound = sum(
            _group_epsilon_bound(alpha, w0.shape, axes)
            for _, w0, _, _, axes in chosen
        )
        assert 0 <= at_start <= bound
    else:
        assert at_start == 0

    for variable, w0, d, _, _ in chosen:
        variable.assign((w0 + d).astype("float32"))
    value = sum(float(_float64(loss)) for loss in model.losses)
    expected = 0.0
    atol = 4 * TINY[dtype] * len(chosen)
    for _, w0, d, f, axes in chosen:
        expected += penalty_reference.shared_penalty(
            kind, alpha, w0 + d, w0, f if kind in FISHER_KINDS else None, axes
        )
        if kind.startswith("group_lasso"):
            atol += _group_epsilon_bound(alpha, w0.shape, axes)
    size = sum(w0.size for _, w0, _, _, _ in chosen)
    np.testing.assert_allclose(
        value, expected, rtol=_rtol(dtype, size), atol=atol
    )
