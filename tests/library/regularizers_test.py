import copy
import json

import keras
import numpy as np
import pytest
from backend import value_and_gradients
from penalty_reference import shared_gradient
from penalty_reference import shared_penalty

from keras_sp import regularizers


def _gradient(regularizer, w):
    variable = keras.Variable(w)
    value, (gradient,) = value_and_gradients(
        lambda: regularizer(variable), [variable]
    )
    return value, gradient


def _arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=shape).astype("float32")
    w = (w0 + 0.3 * rng.normal(size=shape)).astype("float32")
    fisher = rng.uniform(0.1, 2.0, size=shape).astype("float32")
    return w, w0, fisher


CASES = [
    # (kind, class, uses fisher, shape, group axes)
    ("l2_sp", regularizers.L2SP, False, (3, 3, 4, 5), None),
    ("l2_sp_fisher", regularizers.L2SP, True, (3, 3, 4, 5), None),
    ("l1_sp", regularizers.L1SP, False, (6, 5), None),
    ("group_lasso_sp", regularizers.GroupLassoSP, False, (3, 3, 4, 5), None),
    ("group_lasso_sp", regularizers.GroupLassoSP, False, (3, 3, 4, 2), (0, 1)),
    ("group_lasso_sp_fisher", regularizers.GroupLassoSP, True, (6, 5), None),
    ("group_lasso_sp", regularizers.GroupLassoSP, False, (7,), None),
]


def _make(cls, alpha, w0, fisher, uses_fisher, axes):
    kwargs = {"starting_point": w0}
    if uses_fisher:
        kwargs["fisher"] = fisher
    if axes is not None:
        kwargs["group_axes"] = axes
    return cls(alpha, **kwargs)


@pytest.mark.parametrize("kind,cls,uses_fisher,shape,axes", CASES)
def test_value_and_gradient_match_the_paper(
    kind, cls, uses_fisher, shape, axes
):
    w, w0, fisher = _arrays(shape)
    alpha = 0.37
    regularizer = _make(cls, alpha, w0, fisher, uses_fisher, axes)
    reference_axes = axes if axes is not None else tuple(range(len(shape) - 1))
    f = fisher if uses_fisher else None
    expected = shared_penalty(kind, alpha, w, w0, f, reference_axes)
    expected_gradient = shared_gradient(kind, alpha, w, w0, f, reference_axes)
    value, gradient = _gradient(regularizer, w)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(
        gradient, expected_gradient, rtol=1e-4, atol=1e-6
    )


def test_weight_decay_is_half_of_keras_l2():
    w, _, _ = _arrays((4, 3))
    np.testing.assert_allclose(
        float(regularizers.WeightDecay(0.2)(w)),
        shared_penalty("l2", 0.2, w, None, None, ()),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(regularizers.WeightDecay(0.2)(w)),
        float(keras.regularizers.L2(0.2)(w)) / 2,
        rtol=1e-6,
    )


@pytest.mark.parametrize("kind,cls,uses_fisher,shape,axes", CASES)
def test_zero_at_the_starting_point_and_for_alpha_zero(
    kind, cls, uses_fisher, shape, axes
):
    w, w0, fisher = _arrays(shape)
    at_start = _make(cls, 0.5, w0, fisher, uses_fisher, axes)
    value, gradient = _gradient(at_start, w0)
    assert value == 0.0
    assert np.all(np.isfinite(gradient))
    np.testing.assert_array_equal(gradient, np.zeros_like(w0))
    no_strength = _make(cls, 0.0, w0, fisher, uses_fisher, axes)
    assert float(no_strength(w)) == 0.0


def test_zero_starting_point_is_plain_l2():
    w, _, _ = _arrays((3, 3, 2, 4))
    l2_sp = regularizers.L2SP(0.3, starting_point=np.zeros_like(w))
    np.testing.assert_allclose(
        float(l2_sp(w)), float(regularizers.WeightDecay(0.3)(w)), rtol=1e-6
    )


def test_group_lasso_smoothing_is_below_1e8_per_group():
    w, w0, _ = _arrays((4, 6))
    regularizer = regularizers.GroupLassoSP(1.0, starting_point=w0)
    exact = shared_penalty("group_lasso_sp", 1.0, w, w0, None, (0,))
    groups, group_size = 6, 4
    assert abs(float(regularizer(w)) - exact) <= (
        groups * np.sqrt(group_size) * 1e-8 + 1e-5 * exact
    )


@pytest.mark.parametrize("kind,cls,uses_fisher,shape,axes", CASES)
def test_config_round_trip_holds_no_arrays(kind, cls, uses_fisher, shape, axes):
    w, w0, fisher = _arrays(shape)
    regularizer = _make(cls, 0.25, w0, fisher, uses_fisher, axes)
    config = regularizer.get_config()
    text = json.dumps(config)
    assert len(text) < 200
    restored = cls.from_config(json.loads(text))
    assert restored.get_config() == config
    with pytest.raises(ValueError, match="no starting point"):
        restored(w)
    serialized = keras.saving.serialize_keras_object(regularizer)
    assert serialized["registered_name"] == f"keras_sp>{cls.__name__}"
    again = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(again, cls)


@pytest.mark.parametrize("kind,cls,uses_fisher,shape,axes", CASES)
def test_deepcopy_keeps_starting_point_and_fisher(
    kind, cls, uses_fisher, shape, axes
):
    w, w0, fisher = _arrays(shape)
    regularizer = _make(cls, 0.25, w0, fisher, uses_fisher, axes)
    duplicate = copy.deepcopy(regularizer)
    np.testing.assert_array_equal(duplicate.starting_point, w0)
    assert float(duplicate(w)) == float(regularizer(w))


def test_starting_point_is_a_frozen_copy():
    w, w0, _ = _arrays((3, 2))
    original = w0.copy()
    regularizer = regularizers.L2SP(1.0, starting_point=w0)
    w0 += 5.0
    np.testing.assert_array_equal(regularizer.starting_point, original)


def test_l1_sp_has_no_fisher_form():
    with pytest.raises(ValueError, match="fisher_weighted=True"):
        regularizers.L1SP(0.1, np.zeros(3), fisher_weighted=True)


@pytest.mark.parametrize(
    "alpha", [-0.1, float("nan"), float("inf"), "0.1", True, None]
)
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        regularizers.L2SP(alpha, starting_point=np.zeros(3))
    with pytest.raises(ValueError, match="alpha"):
        regularizers.WeightDecay(alpha)


@pytest.mark.parametrize(
    "fisher,message",
    [
        (np.ones(4), "shape"),
        (-np.ones(3), "non-negative"),
        (np.array([1.0, np.nan, 1.0]), "finite"),
    ],
)
def test_bad_fisher(fisher, message):
    with pytest.raises(ValueError, match=message):
        regularizers.L2SP(0.1, starting_point=np.zeros(3), fisher=fisher)


def test_bad_starting_point_and_shape_mismatch():
    with pytest.raises(ValueError, match="finite"):
        regularizers.L2SP(0.1, starting_point=np.array([np.inf, 0.0]))
    regularizer = regularizers.L2SP(0.1, starting_point=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        regularizer(np.zeros((3, 2), "float32"))


def test_bad_group_axes():
    with pytest.raises(ValueError, match="group_axes"):
        regularizers.GroupLassoSP(
            0.1, starting_point=np.zeros((2, 3)), group_axes=[2]
        )
    with pytest.raises(ValueError, match="group_axes"):
        regularizers.GroupLassoSP(
            0.1, starting_point=np.zeros((2, 3)), group_axes=[0, -2]
        )
