"""Activation R², McNemar's paired test and the source-task drop."""

import keras
import numpy as np
import pytest
from scipy import stats

from keras_sp.experiments import measures


def two_models():
    """A reference and a perturbed copy, with a conv and a dense output."""
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(3, 3, activation="relu", name="conv")
    dense = keras.layers.Dense(4, name="dense")
    features = conv(inputs)
    outputs = [features, dense(keras.layers.Flatten()(features))]
    reference = keras.Model(inputs, outputs)
    model = keras.models.clone_model(reference)
    rng = np.random.default_rng(0)
    model.set_weights(
        [w + 0.3 * rng.normal(size=w.shape) for w in reference.get_weights()]
    )
    return reference, model


def numpy_r2(a, b):
    a = a.reshape(-1, a.shape[-1]).astype("float64")
    b = b.reshape(-1, b.shape[-1]).astype("float64")
    return np.array(
        [np.corrcoef(a[:, j], b[:, j])[0, 1] ** 2 for j in range(a.shape[1])]
    )


def test_r2_is_the_squared_correlation_per_feature():
    reference, model = two_models()
    x = np.random.default_rng(1).normal(size=(37, 6, 6, 2)).astype("float32")
    r2 = measures.activation_r2(reference, model, x, batch_size=8)
    expected_a = reference.predict(x, verbose=0)
    expected_b = model.predict(x, verbose=0)
    assert len(r2) == 2
    for values, a, b in zip(r2, expected_a, expected_b, strict=True):
        np.testing.assert_allclose(values, numpy_r2(a, b), rtol=1e-6)
    assert 0.0 < np.nanmin(r2[1]) < 1.0  # the perturbation changed features


def test_r2_of_the_least_squares_line_and_of_an_affine_change():
    inputs = keras.Input((3,))
    reference = keras.Model(inputs, inputs)
    x = np.random.default_rng(2).normal(size=(50, 3)).astype("float32")
    # An affine change of each feature keeps R² = 1 (large offsets too).
    affine = keras.Model(inputs, -3.0 * inputs + 1000.0)
    np.testing.assert_allclose(
        measures.activation_r2(reference, affine, x)[0], 1.0, rtol=1e-6
    )
    # R² = 1 - SSE / SST of the fitted line b ~ u a + v, from the equation.
    mixed = keras.Model(inputs, inputs + keras.ops.flip(inputs, axis=1))
    r2 = measures.activation_r2(reference, mixed, x)[0]
    b = x + x[:, ::-1]
    for j in range(3):
        u, v = np.polyfit(x[:, j], b[:, j], 1)
        residual = b[:, j] - (u * x[:, j] + v)
        sst = np.sum((b[:, j] - b[:, j].mean()) ** 2)
        expected = 1 - np.sum(residual**2) / sst if sst > 1e-9 else np.nan
        if np.isnan(expected):
            assert np.isnan(r2[j])
        else:
            np.testing.assert_allclose(r2[j], expected, rtol=1e-5)


def test_r2_of_a_constant_or_non_finite_feature_is_nan():
    inputs = keras.Input((3,))
    reference = keras.Model(inputs, inputs)
    scale = keras.ops.convert_to_tensor([1.0, 0.0, 1.0])
    # Feature 0 kept, 1 dead (constant), 2 infinite on some examples.
    dead = keras.Model(inputs, inputs * scale / (inputs + 1.0) * (inputs + 1.0))
    x = np.random.default_rng(3).normal(size=(20, 3)).astype("float32")
    x[5, 2] = -1.0
    r2 = measures.activation_r2(reference, dead, x, batch_size=8)[0]
    assert r2[0] == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(r2[1]) and np.isnan(r2[2])


def test_r2_rejects_mismatched_outputs_and_too_few_examples():
    reference, model = two_models()
    x = np.zeros((4, 6, 6, 2), "float32")
    other = keras.Model(reference.input, reference.outputs[:1])
    with pytest.raises(ValueError, match="same shapes"):
        measures.activation_r2(reference, other, x)
    with pytest.raises(ValueError, match="at least 2 examples"):
        measures.activation_r2(reference, model, x[:1])


def test_mcnemar_exact_test_by_hand_and_against_scipy():
    # 9 examples only A gets right, 1 only B: p = 2 (1 + 10) / 2^10.
    a = np.array([1] * 9 + [0] + [1] * 5 + [0] * 3, bool)
    b = np.array([0] * 9 + [1] + [1] * 5 + [0] * 3, bool)
    test = measures.mcnemar_test(a, b)
    assert (test["a_only"], test["b_only"]) == (9, 1)
    assert test["p_value"] == pytest.approx(22 / 1024)
    rng = np.random.default_rng(4)
    for _ in range(5):
        a = rng.random(400) < 0.8
        b = rng.random(400) < 0.75
        test = measures.mcnemar_test(a, b)
        n = test["a_only"] + test["b_only"]
        expected = stats.binomtest(test["a_only"], n, 0.5).pvalue
        assert test["p_value"] == pytest.approx(expected, rel=1e-9)
    assert measures.mcnemar_test(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        measures.mcnemar_test(a, a[:-1])


def test_source_task_drop_uses_the_pretrained_accuracy_as_reference():
    inputs = keras.Input((2,))
    pretrained = keras.Model(inputs, keras.layers.Activation("linear")(inputs))
    swapped = keras.Model(inputs, keras.ops.flip(inputs, axis=1))
    head = keras.layers.Dense(2, kernel_initializer="identity")
    x = np.eye(2, dtype="float32")[[0, 1, 1, 0]]
    y = np.array([0, 1, 1, 1])
    drop = measures.source_task_drop(
        swapped, head, x, y, pretrained_backbone=pretrained
    )
    assert drop == {"pretrained": 0.75, "fine_tuned": 0.25, "drop": -0.5}
    given = measures.source_task_drop(
        swapped, head, x, y, pretrained_accuracy=0.75
    )
    assert given == drop
    with pytest.raises(ValueError, match="exactly one"):
        measures.source_task_drop(swapped, head, x, y)
