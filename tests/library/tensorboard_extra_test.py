"""`PenaltyMonitor(log_dir=...)` without TensorFlow or TensorBoard installed
(the `tensorboard` extra): an ImportError naming the extra, at construction.
The missing module is simulated with `None` in `sys.modules`."""

import re
import sys

import keras
import numpy as np
import pytest

import keras_sp

EXTRA = 'pip install "keras-sp[tensorboard]"'


def block(monkeypatch, package):
    """Makes every import of `package` (and its submodules) fail."""
    names = [n for n in sys.modules if n.split(".")[0] == package]
    for name in names + [package, f"{package}.summary.v2"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("package", ["tensorboard", "tensorflow"])
@pytest.mark.parametrize("through_tensorboard", [False, True])
def test_log_dir_without_the_tensorboard_extra_names_it(
    monkeypatch, tmp_path, package, through_tensorboard
):
    folder = str(tmp_path / "logs")
    log_dir = (
        keras.callbacks.TensorBoard(folder) if through_tensorboard else folder
    )
    block(monkeypatch, package)
    with pytest.raises(ImportError) as raised:
        keras_sp.callbacks.PenaltyMonitor(log_dir=log_dir)
    message = str(raised.value)
    assert EXTRA in message
    assert message.endswith(f"Received: log_dir={folder!r}")
    assert re.search(rf"\b{package}\b", message)
    assert isinstance(raised.value.__cause__, ImportError)
    assert not (tmp_path / "logs").exists()


def test_without_log_dir_the_monitor_needs_no_tensorboard(monkeypatch):
    """Eq. 2 (no new layers): sp_penalty = alpha/2 ||w - w0||^2
    and sp_distance = ||w - w0||, measured without TensorBoard."""
    block(monkeypatch, "tensorboard")
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2, use_bias=False, name="fc")(inputs)
    model = keras.Model(inputs, outputs)
    w0 = np.arange(6, dtype="float32").reshape(3, 2) / 10
    model.get_layer("fc").kernel.assign(w0)
    keras_sp.regularize(model, "l2_sp", alpha=0.4, new_layers=())
    delta = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]], dtype="float32")
    model.get_layer("fc").kernel.assign(w0 + delta)
    monitor = keras_sp.callbacks.PenaltyMonitor()
    monitor.set_model(model)
    values = monitor.measure()
    assert monitor.log_dir is None
    np.testing.assert_allclose(
        values["sp_penalty"], 0.4 / 2 * np.sum(delta**2), rtol=1e-6
    )
    np.testing.assert_allclose(
        values["sp_distance"], np.sqrt(np.sum(delta**2)), rtol=1e-6
    )
    np.testing.assert_allclose(
        values["sp_drift"],
        np.sqrt(np.sum(delta**2)) / np.sqrt(np.sum(w0**2)),
        rtol=1e-6,
    )
