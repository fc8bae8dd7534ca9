"""Fits L2-SP-Fisher and GL-SP-Fisher under JAX `ModelParallel` on a
(1, 2) device mesh with `keras_sp.distribution.add_penalty_layouts`, and on
one device, and writes the numbers to the `.npz` file named on the command
line (read by `jax_test.py`).

Run with XLA_FLAGS=--xla_force_host_platform_device_count=2 and
KERAS_BACKEND=jax (set before JAX initialises, hence a subprocess).
"""

import sys
import warnings

import jax
import keras
import numpy as np

import keras_sp
from keras_sp import penalties
from keras_sp.distribution import add_penalty_layouts
from keras_sp.fisher import diagonal_fisher

# As pytest's filterwarnings (setup.cfg): warnings are errors, but one.
warnings.simplefilter("error")
warnings.filterwarnings(
    "ignore",
    "__array__ implementation doesn't accept a copy keyword",
    DeprecationWarning,
)

KINDS = ("l2_sp_fisher", "group_lasso_sp_fisher", "l1_sp")


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)
    return x, y


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="c1"),
            keras.layers.Dense(8, activation="tanh", name="c2"),
            keras.layers.Dense(3, name="head"),
        ],
        name="net",
    )


def layout_map():
    mesh = keras.distribution.DeviceMesh(
        (1, 2), ["batch", "model"], devices=keras.distribution.list_devices()
    )
    layouts = keras.distribution.LayoutMap(mesh)
    # Regexes that also match the paths of a loaded Sequential ("c1/kernel"
    # for "net/c1/kernel"); the head stays replicated.
    layouts[".*c1/kernel"] = (None, "model")
    layouts[".*c1/bias"] = ("model",)
    layouts[".*c2/kernel"] = ("model", None)
    return layouts


def regularized(kind, x, y):
    model = build()
    fisher = None
    if kind.endswith("fisher"):
        fisher = diagonal_fisher(model, (x, y), mode="empirical")
    keras_sp.regularize(
        model, kind, alpha=0.5, beta=0.05, new_layers=["head"], fisher=fisher
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model, x, y, epochs=2):
    history = model.fit(
        x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0
    )
    return np.array(history.history["loss"])


def record_placement(results, prefix, model):
    """The sharding spec of each penalized weight and of its w0 and F, and
    whether each w0/F sharding equals the weight's."""
    attached = penalties.attached_penalties(model)
    for index, (_, variable, reg) in enumerate(attached):
        weight = variable.value.sharding
        results[f"{prefix}/{index}/weight"] = np.array(str(weight.spec))
        for name in ("_starting_point", "_fisher"):
            state = getattr(reg, name, None)
            if state is None:
                continue
            sharding = state.value.sharding
            results[f"{prefix}/{index}/{name}"] = np.array(str(sharding.spec))
            results[f"{prefix}/{index}/{name}_path"] = np.array(state.path)
            results[f"{prefix}/{index}/{name}_equal"] = np.array(
                int(sharding == weight)
            )


def main(out):
    assert len(jax.devices()) == 2, jax.devices()
    x, y = data()
    results = {}
    for kind in KINDS:
        model = regularized(kind, x, y)
        results[f"{kind}/one/loss"] = fit(model, x, y)
        for index, variable in enumerate(model.weights):
            results[f"{kind}/one/{index}"] = keras.ops.convert_to_numpy(
                variable
            )

        layouts = layout_map()
        distribution = keras.distribution.ModelParallel(
            layout_map=layouts, batch_dim_name="batch"
        )
        with distribution.scope():
            model = regularized(kind, x, y)
            record_placement(results, f"{kind}/before", model)
            placed = add_penalty_layouts(layouts, model)
            results[f"{kind}/placed"] = np.array(sorted(placed))
            record_placement(results, f"{kind}/after", model)
            results[f"{kind}/two/loss"] = fit(model, x, y)
            record_placement(results, f"{kind}/fitted", model)
            for index, variable in enumerate(model.weights):
                results[f"{kind}/two/{index}"] = keras.ops.convert_to_numpy(
                    variable
                )
            if kind == "l2_sp_fisher":
                path = out + ".keras"
                model.save(path)
                loaded = keras.saving.load_model(path)
                record_placement(results, "saved/loaded", loaded)
                add_penalty_layouts(layouts, loaded)
                record_placement(results, "saved/placed", loaded)
                results["saved/loaded/loss"] = fit(loaded, x, y, epochs=1)
                results["saved/original/loss"] = fit(model, x, y, epochs=1)
                for tag, current in (("original", model), ("loaded", loaded)):
                    for index, variable in enumerate(current.weights):
                        results[f"saved/{tag}/{index}"] = (
                            keras.ops.convert_to_numpy(variable)
                        )
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
