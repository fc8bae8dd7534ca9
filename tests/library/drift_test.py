import numpy as np
import pytest
from backend import to_numpy
from penalties_test import build_model
from penalties_test import perturb

import keras_sp


def test_weight_drift_is_the_euclidean_distance():
    model = build_model()
    reference = {v.path: v.numpy().copy() for v in model.weights}
    perturb(model, scale=0.1)
    drift = keras_sp.weight_drift(model, reference)
    difference = np.concatenate(
        [(v.numpy() - reference[v.path]).ravel() for v in model.weights]
    )
    norm = np.sqrt(sum(np.sum(a**2) for a in reference.values()))
    np.testing.assert_allclose(drift["distance"], np.linalg.norm(difference))
    np.testing.assert_allclose(drift["relative"], drift["distance"] / norm)
    assert drift["variables"] == len(model.weights)


def test_weight_drift_defaults_to_the_attached_starting_point():
    model = build_model()
    keras_sp.regularize(model, "group_lasso_sp", alpha=0.1, new_layers=())
    assert keras_sp.weight_drift(model)["distance"] == 0.0


def test_weight_drift_rejects_a_misshapen_reference():
    model = build_model()
    reference = {model.weights[0].path: np.zeros(3)}
    with pytest.raises(ValueError, match="must have shape"):
        keras_sp.weight_drift(model, reference)


def _bn_backbone():
    import keras

    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="backbone")


def test_reestimate_batchnorm_gives_the_exact_statistics_in_order():
    import keras

    backbone = _bn_backbone()
    model = keras.Sequential([backbone, keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(50, 6, 6, 2))
    x = x.astype("float32")
    assert keras_sp.reestimate_batchnorm(model, x, batch_size=16) == 2
    for name in ("bn1", "bn2"):
        layer = backbone.get_layer(name)
        # Brute force, after the update: the layer's input over all of x.
        inputs = to_numpy(keras.Model(backbone.input, layer.input)(x))
        inputs = inputs.astype("float64").reshape(-1, inputs.shape[-1])
        np.testing.assert_allclose(
            to_numpy(layer.moving_mean), inputs.mean(axis=0), rtol=1e-4
        )
        np.testing.assert_allclose(
            to_numpy(layer.moving_variance), inputs.var(axis=0), rtol=1e-4
        )
