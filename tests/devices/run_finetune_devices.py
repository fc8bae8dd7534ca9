"""Runs a tiny `keras-sp finetune` experiment with `devices="one"`, with
`devices="all"` over two logical CPUs, and (the control) with
`devices="all"` but per-replica BatchNormalization statistics; writes each
`results.json` under the folder named on the command line, with
`training.json`, what the strategy's runs trained on (read by
`finetune_devices_test.py`).

Run with KERAS_BACKEND=tensorflow; the logical devices must be configured
before TensorFlow initialises, hence a subprocess.
"""

import json
import os
import sys
import warnings

import tensorflow as tf

CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    CPU,
    [tf.config.LogicalDeviceConfiguration()] * 2,
)

import keras  # noqa: E402

from keras_sp import _keras_private  # noqa: E402
from keras_sp.experiments import data as datasets  # noqa: E402
from keras_sp.experiments import fashion_source  # noqa: E402
from keras_sp.experiments import finetune  # noqa: E402
from keras_sp.experiments import training  # noqa: E402
from keras_sp.experiments.config import ConfigError  # noqa: E402
from keras_sp.experiments.config import load_config  # noqa: E402
from keras_sp.experiments.finetune import _runs  # noqa: E402

sys.path.insert(
    0, os.path.join(os.path.dirname(__file__), os.pardir, "experiments")
)
from finetune_test import tiny_fashion  # noqa: E402

# As pytest's filterwarnings (setup.cfg): warnings are errors, but one.
warnings.simplefilter("error")
warnings.filterwarnings(
    "ignore",
    "__array__ implementation doesn't accept a copy keyword",
    DeprecationWarning,
)


def config_values(source_path):
    """Three kinds, one grid point each, a freezing run, R² and Table 3."""
    return {
        "backbone": source_path,
        "input_size": 28,
        "image_size": 28,
        "preprocessing": "none",
        "target": "fashion_mnist",
        "per_class": [6],
        "target_classes": [5, 6, 7, 8, 9],
        "test_per_class": 4,
        "validation_fraction": 0.34,
        "source": "fashion_mnist",
        "source_classes": [0, 1, 2, 3, 4],
        "source_examples": 20,
        "source_batchnorm": ["as_trained", "reestimated"],
        "kinds": ["l2", "l2_sp", "l2_sp_fisher"],
        "alpha_grid": {"l2": [1e-4], "l2_sp": [0.1], "l2_sp_fisher": [1.0]},
        "beta": 0.01,
        "learning_rate_grid": [0.05],
        "iterations": 6,
        "lr_drop_at": 4,
        "warmup_iterations": 1,
        "batch_size": 8,
        "repeats": 1,
        "fisher_data": "source",
        "fisher_examples": 10,
        "fisher_scale": "mean",
        "freeze_units": [1],
        "freeze_kinds": ["l2_sp"],
        "freeze_repeats": 1,
        "r2_kinds": ["l2_sp"],
        "r2_examples": 10,
    }


def main(out):
    assert len(tf.config.list_logical_devices("CPU")) == 2
    data = tiny_fashion()
    datasets.load_fashion_mnist = lambda: data
    source = fashion_source.build_small_cnn(
        5, width=4, fc_units=None, head_name="source_head"
    )
    source_path = os.path.join(out, "source.keras")
    source.save(source_path)

    # What each run of the strategy trains on: replicas, variable types and
    # BatchNormalization layers synchronized.
    trained = []
    fine_tune = training.fine_tune

    def recording_fine_tune(model, dataset, **kwargs):
        strategy = tf.distribute.get_strategy()
        batchnorm = [
            layer.synchronized
            for layer in _keras_private.all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        trained.append(
            {
                "replicas": strategy.num_replicas_in_sync,
                "variables": sorted(
                    {type(v.value).__name__ for v in model.weights}
                ),
                "batchnorm_synchronized": batchnorm,
            }
        )
        return fine_tune(model, dataset, **kwargs)

    training.fine_tune = recording_fine_tune
    synchronize = _runs._synchronize_batchnorm
    for name, devices, synchronized in (
        ("one", "one", True),
        ("all", "all", True),
        ("all_replica_batchnorm", "all", False),
    ):
        trained.clear()
        _runs._synchronize_batchnorm = (
            synchronize if synchronized else lambda model: None
        )
        values = dict(config_values(source_path), devices=devices)
        config = load_config(values, finetune.FinetuneConfig)
        folder = os.path.join(out, name)
        finetune.run_finetune(config, folder, verbose=0)
        with open(os.path.join(folder, "training.json"), "w") as handle:
            json.dump(trained, handle)
    # A global batch that does not split evenly over the two replicas.
    values = dict(config_values(source_path), devices="all", batch_size=7)
    config = load_config(values, finetune.FinetuneConfig)
    try:
        finetune.run_finetune(config, os.path.join(out, "odd"), verbose=0)
    except ConfigError as error:
        with open(os.path.join(out, "odd_batch_error.txt"), "w") as handle:
            handle.write(str(error))


if __name__ == "__main__":
    main(sys.argv[1])
