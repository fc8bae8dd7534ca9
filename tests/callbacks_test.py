import keras
import numpy as np
import pytest
from penalties_test import build_model
from penalties_test import compiled
from penalties_test import data
from penalties_test import expected_penalty

import keras_sp


def test_penalty_monitor_logs_penalty_and_distance():
    model = build_model()
    w0 = {v.path: v.numpy().copy() for v in model.weights}
    keras_sp.regularize(
        model, "l2_sp", alpha=0.3, beta=0.02, new_layers=["head"]
    )
    compiled(model)
    x, y = data()
    monitor = keras_sp.callbacks.PenaltyMonitor()
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[monitor])
    penalty, _ = expected_penalty(
        model, "l2_sp", 0.3, 0.02, w0, None, "kernels"
    )
    shared = [
        v
        for v in model.trainable_variables
        if v.name == "kernel" and "head" not in v.path
    ]
    distance = np.sqrt(
        sum(np.sum((v.numpy() - w0[v.path]) ** 2) for v in shared)
    )
    norm = np.sqrt(sum(np.sum(w0[v.path] ** 2) for v in shared))
    logs = history.history
    assert len(logs["sp_penalty"]) == 2
    assert logs["sp_distance"][0] > 0
    np.testing.assert_allclose(logs["sp_penalty"][-1], penalty, rtol=1e-5)
    np.testing.assert_allclose(logs["sp_distance"][-1], distance, rtol=1e-5)
    np.testing.assert_allclose(logs["sp_drift"][-1], distance / norm, rtol=1e-5)


def test_penalty_monitor_for_l2_measures_from_the_weights_at_regularize():
    model = build_model()
    keras_sp.regularize(model, "l2", alpha=0.1)
    compiled(model)
    x, y = data()
    monitor = keras_sp.callbacks.PenaltyMonitor()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.measure()["sp_distance"] > 0


def test_penalty_monitor_without_penalties_warns_once():
    model = compiled(build_model())
    x, y = data()
    monitor = keras_sp.callbacks.PenaltyMonitor()
    with pytest.warns(UserWarning, match="no starting point"):
        history = model.fit(x, y, epochs=2, verbose=0, callbacks=[monitor])
    assert history.history["sp_penalty"] == [0.0, 0.0]
    assert "sp_distance" not in history.history
    assert isinstance(monitor, keras.callbacks.Callback)
