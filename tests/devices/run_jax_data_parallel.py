"""Fits each penalty kind on one device and under JAX `DataParallel` over
two host devices, and writes the numbers to the `.npz` file named on the
command line (read by `jax_test.py`).

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
from keras_sp.fisher import diagonal_fisher

# As pytest's filterwarnings (setup.cfg): warnings are errors, but one.
warnings.simplefilter("error")
warnings.filterwarnings(
    "ignore",
    "__array__ implementation doesn't accept a copy keyword",
    DeprecationWarning,
)

KINDS = penalties.KINDS
FISHER_KINDS = ("l2_sp_fisher", "group_lasso_sp_fisher")


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


def compile_model(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def run(kind, x, y):
    """Regularizes a fresh model with `kind`, fits 2 epochs; returns the
    per-epoch losses, the weights and the model."""
    model = build()
    fisher = None
    if kind in FISHER_KINDS:
        fisher = diagonal_fisher(model, (x, y), mode="empirical")
    keras_sp.regularize(
        model,
        kind,
        alpha=0.5,
        beta=0.05,
        new_layers=["head"],
        fisher=fisher,
    )
    compile_model(model)
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return np.array(history.history["loss"]), model


def sharding_of(value):
    """(number of devices, fully replicated) of a JAX array."""
    sharding = value.sharding
    return np.array(
        [len(sharding.device_set), int(sharding.is_fully_replicated)]
    )


def main(out):
    assert len(jax.devices()) == 2, jax.devices()
    x, y = data()
    results = {}
    distribution = keras.distribution.DataParallel()
    for kind in KINDS:
        loss, model = run(kind, x, y)
        results[f"{kind}/one/loss"] = loss
        for variable in model.weights:
            results[f"{kind}/one/{variable.path}"] = keras.ops.convert_to_numpy(
                variable
            )
        with distribution.scope():
            loss, model = run(kind, x, y)
            results[f"{kind}/two/loss"] = loss
            for variable in model.weights:
                results[f"{kind}/two/{variable.path}"] = (
                    keras.ops.convert_to_numpy(variable)
                )
                results[f"{kind}/sharding/{variable.path}"] = sharding_of(
                    variable.value
                )
            for _, variable, reg in penalties.attached_penalties(model):
                for name in ("_starting_point", "_fisher"):
                    state = getattr(reg, name, None)
                    if state is not None:
                        key = f"{kind}/sharding/{variable.path}{name}"
                        results[key] = sharding_of(state.value)

    # diagonal_fisher under the distribution and on one device.
    model = build()
    for mode in ("exact", "sampled", "empirical"):
        results[f"fisher/{mode}/one"] = diagonal_fisher(
            model, (x, y), mode=mode, seed=3, batch_size=8
        )["net/c1/kernel"]
    with distribution.scope():
        model = build()
        for mode in ("exact", "sampled", "empirical"):
            results[f"fisher/{mode}/two"] = diagonal_fisher(
                model, (x, y), mode=mode, seed=3, batch_size=8
            )["net/c1/kernel"]

    # Save under the distribution, load under it, continue both.
    path = out + ".keras"
    with distribution.scope():
        _, model = run("group_lasso_sp_fisher", x, y)
        model.save(path)
        loaded = keras.saving.load_model(path)
        # A loaded Sequential's paths lose the model's name ("c1/kernel"
        # for "net/c1/kernel"): the variables are keyed by position.
        for tag, current in (("original", model), ("loaded", loaded)):
            attached = penalties.attached_penalties(current)
            for index, (_, _, reg) in enumerate(attached):
                if getattr(reg, "starting_point", None) is None:
                    continue
                base = f"saved/{tag}/{index}"
                results[f"{base}/w0"] = reg.starting_point
                results[f"{base}/w0_sharding"] = sharding_of(
                    reg.reference.value
                )
                if reg.fisher is not None:
                    results[f"{base}/fisher"] = reg.fisher
                    results[f"{base}/fisher_sharding"] = sharding_of(
                        reg._fisher.value
                    )
            history = current.fit(
                x, y, batch_size=8, epochs=1, shuffle=False, verbose=0
            )
            results[f"saved/{tag}/loss"] = np.array(history.history["loss"])
            for index, variable in enumerate(current.weights):
                results[f"saved/{tag}/weights/{index}"] = (
                    keras.ops.convert_to_numpy(variable)
                )
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
