import numpy as np
import pytest
from penalties_test import build_model
from penalties_test import perturb

import keras_sp


def test_weight_drift_is_the_euclidean_distance():
    model = build_model()
    reference = {v.path: v.numpy().copy() for v in model.weights}
    perturb(model, scale=0.1)
    drift = keras_sp.analysis.weight_drift(model, reference)
    difference = np.concatenate(
        [(v.numpy() - reference[v.path]).ravel() for v in model.weights]
    )
    norm = np.sqrt(sum(np.sum(a**2) for a in reference.values()))
    np.testing.assert_allclose(drift["distance"], np.linalg.norm(difference))
    np.testing.assert_allclose(drift["relative"], drift["distance"] / norm)
    assert drift["variables"] == len(model.weights)


def test_weight_drift_defaults_to_the_attached_starting_point():
    model = build_model()
    keras_sp.regularize(model, "group_lasso_sp", alpha=0.1)
    assert keras_sp.analysis.weight_drift(model)["distance"] == 0.0


def test_weight_drift_rejects_a_misshapen_reference():
    model = build_model()
    reference = {model.weights[0].path: np.zeros(3)}
    with pytest.raises(ValueError, match="must have shape"):
        keras_sp.analysis.weight_drift(model, reference)
