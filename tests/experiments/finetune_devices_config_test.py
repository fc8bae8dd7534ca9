"""The `devices` key of `FinetuneConfig`: its values, its errors, and that
it is not a setting of the results file."""

import keras
import pytest

from keras_sp.experiments import finetune
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import load_config
from keras_sp.experiments.finetune import _runs
from keras_sp.experiments.finetune._config import results_settings
from keras_sp.experiments.finetune._config import settings_of

VALUES = {
    "target": "fashion_mnist",
    "preprocessing": "mobilenet",
    "fisher_data": "target",
}


def config(**values):
    return load_config(dict(VALUES, **values), finetune.FinetuneConfig)


def test_devices_defaults_to_one_and_reaches_the_training_settings():
    assert finetune.FinetuneConfig().devices == "one"
    training = settings_of(_runs.TrainingSettings, config(devices="all"))
    assert training.devices == "all"


@pytest.mark.parametrize("value", ["two", "All", ""])
def test_an_unknown_devices_value_is_refused(value):
    with pytest.raises(ConfigError) as error:
        config(devices=value)
    assert str(error.value) == (
        "Config key 'devices' must be one of ['one', 'all']. "
        f"Received: devices={value!r}"
    )


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_all_devices_needs_the_tensorflow_backend(monkeypatch, backend):
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    with pytest.raises(ConfigError) as error:
        config(devices="all")
    message = str(error.value)
    assert message.startswith("Config key 'devices': 'all'")
    assert f"on the {backend} backend" in message
    assert message.endswith("Received: devices='all'")
    # one device runs on every backend
    assert config(devices="one").devices == "one"


def test_devices_is_not_a_stored_setting():
    """A run on all devices equals the same run on one: a results file of
    one can be resumed with the other."""
    one = results_settings(config(devices="one"))
    assert "devices" not in one
    assert results_settings(config(devices="all")) == one
    # every other key but the extent keys is stored
    assert "batch_size" in one and "batchnorm" in one
