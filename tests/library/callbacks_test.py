import os

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


def _read_scalars(folder):
    import glob

    import tensorflow as tf

    scalars = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue
                scalars.setdefault(value.tag, {})[event.step] = float(
                    tf.make_ndarray(value.tensor)
                )
    return scalars


@pytest.mark.parametrize("through_tensorboard", [False, True])
def test_penalty_monitor_writes_tensorboard_scalars_per_unit(
    tmp_path, through_tensorboard
):
    model = build_model()
    w0 = {v.path: v.numpy().copy() for v in model.weights}
    keras_sp.regularize(model, "l2_sp", alpha=0.3, new_layers=["head"])
    compiled(model)
    x, y = data()
    board = keras.callbacks.TensorBoard(str(tmp_path))
    log_dir = board if through_tensorboard else str(tmp_path)
    monitor = keras_sp.callbacks.PenaltyMonitor(log_dir=log_dir)
    callbacks = [monitor, board] if through_tensorboard else [monitor]
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=callbacks)
    scalars = _read_scalars(os.path.join(tmp_path, "keras_sp"))
    np.testing.assert_allclose(
        scalars["sp_distance"][1], history.history["sp_distance"][1], 1e-6
    )
    units = keras_sp.depth_units(model)
    expected = {}
    for index, unit in enumerate(units):
        variables = [
            v
            for layer in unit
            for v in layer.weights
            if v.name == "kernel" and "head" not in v.path
        ]
        if variables:
            name = f"{index:03d}_{unit[0].name}"
            expected[name] = np.sqrt(
                sum(np.sum((v.numpy() - w0[v.path]) ** 2) for v in variables)
            )
    assert len(expected) == 3  # conv, depthwise and fc
    for name, distance in expected.items():
        np.testing.assert_allclose(
            scalars[f"sp_unit_distance/{name}"][1], distance, rtol=1e-5
        )
    if through_tensorboard:
        train = _read_scalars(os.path.join(tmp_path, "train"))
        assert "epoch_sp_penalty" in train


def test_penalty_monitor_bad_log_dir():
    with pytest.raises(ValueError, match="log_dir=3"):
        keras_sp.callbacks.PenaltyMonitor(log_dir=3)
