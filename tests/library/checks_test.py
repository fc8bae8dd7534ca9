"""The argument checks keras-sp's modules share (keras_sp/_checks.py)."""

import numpy as np
import pytest

from keras_sp import _checks


def test_check_array_returns_floats_and_names_the_argument():
    out = _checks.check_array("fisher", [[1, 2]], non_negative=True)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"`fisher\['k'\]` must be finite"):
        _checks.check_array("fisher['k']", [1.0, np.nan])
    with pytest.raises(ValueError, match=r"`fisher` must be non-negative.*-2"):
        _checks.check_array("fisher", [1.0, -2.0], non_negative=True)
    # A starting point may be negative.
    np.testing.assert_array_equal(_checks.check_array("w0", [-2.0]), [-2.0])
    with pytest.raises(ValueError, match=r"shape \(3,\).*w0 of shape \(2,\)"):
        _checks.check_array("w0", [1.0, 2.0], shape=(3,))
    with pytest.raises(ValueError, match="`w0` must be a real array"):
        _checks.check_array("w0", [1j])


def test_check_bool_and_coefficient():
    assert _checks.check_bool("normalize", False) is False
    with pytest.raises(ValueError, match="Received: normalize=1"):
        _checks.check_bool("normalize", 1)
    assert _checks.check_coefficient("alpha", np.int64(2)) == 2.0
    for bad in (-0.1, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="`alpha` must be a non-negative"):
            _checks.check_coefficient("alpha", bad)


def test_fisher_on_jax_and_torch_needs_all_trainable_variables():
    import keras

    from keras_sp import _fisher_data

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    variables = model.trainable_variables
    _fisher_data.check_all_trainable(model, variables, "JAX")
    with pytest.raises(ValueError, match="JAX backend.*a subset of 1 var"):
        _fisher_data.check_all_trainable(model, variables[:1], "JAX")
    with pytest.raises(ValueError, match="a subset of 2 variables"):
        _fisher_data.check_all_trainable(model, variables[::-1], "PyTorch")
