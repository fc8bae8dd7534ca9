"""Models saved with the old name of `WeightDecay`, "keras_sp>L2", still load.

`WeightDecay(alpha)` is alpha/2 ||w||^2 (eq. 1 of Li, Grandvalet & Davoine,
ICML 2018), half of `keras.regularizers.L2(alpha)`; it was called `L2`.
"""

import json
import warnings
import zipfile

import keras
import numpy as np
import pytest
from backend import total

from keras_sp import regularizers


def _saved_with_old_name(tmp_path, alpha):
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(
        3,
        name="fc",
        kernel_initializer=keras.initializers.RandomNormal(seed=0),
        kernel_regularizer=regularizers.WeightDecay(alpha),
    )(inputs)
    model = keras.Model(inputs, outputs)
    new_path = tmp_path / "new.keras"
    model.save(new_path)
    old_path = tmp_path / "old.keras"
    with zipfile.ZipFile(new_path) as source:
        with zipfile.ZipFile(old_path, "w") as target:
            for item in source.infolist():
                data = source.read(item.filename)
                if item.filename == "config.json":
                    text = data.decode()
                    assert '"registered_name": "keras_sp>WeightDecay"' in text
                    text = text.replace("keras_sp>WeightDecay", "keras_sp>L2")
                    text = text.replace(
                        '"class_name": "WeightDecay"', '"class_name": "L2"'
                    )
                    assert "WeightDecay" not in text
                    json.loads(text)
                    data = text.encode()
                target.writestr(item, data)
    return model, old_path


def test_model_saved_with_old_name_loads_with_a_deprecation_warning(tmp_path):
    model, old_path = _saved_with_old_name(tmp_path, alpha=0.3)
    with pytest.warns(DeprecationWarning, match="WeightDecay"):
        loaded = keras.saving.load_model(old_path)
    regularizer = loaded.get_layer("fc").kernel_regularizer
    assert isinstance(regularizer, regularizers.WeightDecay)
    assert regularizer.alpha == 0.3
    kernel = model.get_layer("fc").kernel.numpy()
    np.testing.assert_array_equal(loaded.get_layer("fc").kernel.numpy(), kernel)
    # eq. 1: alpha/2 ||w||^2, computed with NumPy in float64.
    expected = 0.3 / 2 * np.sum(kernel.astype("float64") ** 2)
    np.testing.assert_allclose(float(regularizer(kernel)), expected, rtol=1e-6)
    x = np.random.default_rng(1).normal(size=(2, 4)).astype("float32")
    loaded(x)
    np.testing.assert_allclose(total(loaded.losses), expected, rtol=1e-6)


def test_old_name_warns_and_equals_weight_decay():
    w = np.random.default_rng(0).normal(size=(5, 2)).astype("float32")
    with pytest.warns(DeprecationWarning, match="WeightDecay"):
        old = regularizers.L2(0.2)
    assert float(old(w)) == float(regularizers.WeightDecay(0.2)(w))
    np.testing.assert_allclose(
        float(old(w)), 0.1 * np.sum(w.astype("float64") ** 2), rtol=1e-6
    )
    assert "L2" not in regularizers.__all__


def test_new_name_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regularizer = regularizers.WeightDecay(0.1)
    assert repr(regularizer) == "WeightDecay(alpha=0.1)"
