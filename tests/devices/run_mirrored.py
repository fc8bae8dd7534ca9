"""Fits the -SP penalties under TensorFlow's `MirroredStrategy` over two
logical CPUs and on one device, and writes the numbers to the `.npz` file
named on the command line (read by `tensorflow_test.py`).

Run with KERAS_BACKEND=tensorflow; the logical devices must be configured
before TensorFlow initialises, hence a subprocess.
"""

import contextlib
import sys
import warnings

import tensorflow as tf

CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    CPU,
    [tf.config.LogicalDeviceConfiguration()] * 2,
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sp  # noqa: E402
from keras_sp import penalties  # noqa: E402
from keras_sp.fisher import diagonal_fisher  # noqa: E402

# As pytest's filterwarnings (setup.cfg): warnings are errors, but one.
warnings.simplefilter("error")
warnings.filterwarnings(
    "ignore",
    "__array__ implementation doesn't accept a copy keyword",
    DeprecationWarning,
)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)
    return x, y


def build(batch_norm=None):
    """A small MLP; `batch_norm` None (no BatchNormalization), "replica"
    (per-replica statistics) or "synchronized"."""
    keras.utils.set_random_seed(0)
    # No bias before BatchNormalization: its gradient is 0 up to rounding.
    layers = [
        keras.Input((6,)),
        keras.layers.Dense(8, use_bias=batch_norm is None, name="c1"),
    ]
    if batch_norm is not None:
        layers.append(
            keras.layers.BatchNormalization(
                synchronized=batch_norm == "synchronized", name="bn"
            )
        )
    layers += [
        keras.layers.Activation("tanh"),
        keras.layers.Dense(8, activation="tanh", name="c2"),
        keras.layers.Dense(3, name="head"),
    ]
    return keras.Sequential(layers, name="net")


def fit(kind, x, y, batch_norm=None, strategy=None):
    """Builds, regularizes and fits under `strategy`'s scope (None: one
    device); F is computed outside the scope (see `main`)."""

    def scope():
        return strategy.scope() if strategy else contextlib.nullcontext()

    with scope():
        model = build(batch_norm)
    fisher = None
    if kind.endswith("fisher"):
        fisher = diagonal_fisher(model, (x, y), mode="empirical")
    with scope():
        return regularize_and_fit(model, kind, x, y, fisher)


def regularize_and_fit(model, kind, x, y, fisher):
    keras_sp.regularize(
        model, kind, alpha=0.5, beta=0.05, new_layers=["head"], fisher=fisher
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return np.array(history.history["loss"]), model


def store(results, prefix, loss, model):
    results[f"{prefix}/loss"] = loss
    for index, variable in enumerate(model.weights):
        results[f"{prefix}/{index}"] = keras.ops.convert_to_numpy(variable)
    # The penalty of the fitted weights, summed over the variables.
    results[f"{prefix}/penalty"] = np.array(
        sum(float(keras.ops.convert_to_numpy(v)) for v in model.losses)
    )


def main(out):
    assert len(tf.config.list_logical_devices("CPU")) == 2
    x, y = data()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {"replicas": np.array(strategy.num_replicas_in_sync)}
    for kind in penalties.KINDS:
        store(results, f"{kind}/one", *fit(kind, x, y))
        loss, model = fit(kind, x, y, strategy=strategy)
        for _, variable, reg in penalties.attached_penalties(model):
            for name in ("_starting_point", "_fisher"):
                state = getattr(reg, name, None)
                if state is not None:
                    key = f"{kind}/type/{variable.path}{name}"
                    results[key] = np.array(type(state.value).__name__)
        store(results, f"{kind}/two", loss, model)

    for batch_norm in ("synchronized", "replica"):
        store(
            results,
            f"bn_{batch_norm}/one",
            *fit("l2_sp", x, y, batch_norm),
        )
        loss, model = fit("l2_sp", x, y, batch_norm, strategy)
        store(results, f"bn_{batch_norm}/two", loss, model)

    model = build()
    results["fisher/one"] = diagonal_fisher(model, (x, y), batch_size=8)[
        "net/c1/kernel"
    ]
    # diagonal_fisher inside the scope fails (cross-replica context); a
    # model built under the scope is read outside it.
    with strategy.scope():
        model = build()
    try:
        with strategy.scope():
            diagonal_fisher(model, (x, y), batch_size=8)
    except ValueError as error:
        results["fisher/inside_scope_error"] = np.array(str(error))
    results["fisher/two"] = diagonal_fisher(model, (x, y), batch_size=8)[
        "net/c1/kernel"
    ]
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
