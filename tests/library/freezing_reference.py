"""A two-layer linear model and its NumPy gradients, to check training
steps with frozen depth units against closed forms."""

import keras
import numpy as np

LEARNING_RATE = 0.1
MOMENTUM = 0.9


def linear_model(optimizer=None):
    """x (3) -> `fc` Dense(4) -> `head` Dense(2), mean squared error: two
    depth units, compiled."""
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, name="fc")(inputs)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs, name="linear")
    model.compile(
        optimizer=optimizer
        or keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
        loss="mean_squared_error",
    )
    return model


def linear_data(count=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 3)).astype("float32")
    return x, rng.normal(size=(count, 2)).astype("float32")


def values(model):
    """`{variable.path: array}` for every variable of `model`."""
    return {
        v.path: keras.ops.convert_to_numpy(v).astype("float64").copy()
        for v in model.weights
    }


def gradients(weights, x, y):
    """Gradients of the mean squared error (mean over the batch and the 2
    outputs) of the linear model, by the chain rule."""
    w1, b1 = weights["fc/kernel"], weights["fc/bias"]
    w2, b2 = weights["head/kernel"], weights["head/bias"]
    x = x.astype("float64")
    hidden = x @ w1 + b1
    outputs = hidden @ w2 + b2
    d_outputs = 2 * (outputs - y) / outputs.size
    d_hidden = d_outputs @ w2.T
    return {
        "fc/kernel": x.T @ d_hidden,
        "fc/bias": d_hidden.sum(0),
        "head/kernel": hidden.T @ d_outputs,
        "head/bias": d_outputs.sum(0),
    }


def slot(optimizer, variable, name="momentum"):
    """The optimizer variable `name` kept for the model variable `variable`,
    as an array (Keras names it `{path with "_"}_{name}`)."""
    wanted = f"{variable.path.replace('/', '_')}_{name}"
    found = [v for v in optimizer.variables if v.name == wanted]
    assert len(found) == 1, (wanted, [v.name for v in optimizer.variables])
    return keras.ops.convert_to_numpy(found[0]).copy()


def sgd_step(weights, momenta, grads, trained):
    """One SGD step with momentum, as Keras writes it: m <- mu m - lr g,
    w <- w + m, for the variables in `trained`; the others stay."""
    new_weights, new_momenta = dict(weights), dict(momenta)
    for path in trained:
        new_momenta[path] = (
            MOMENTUM * momenta.get(path, 0.0) - LEARNING_RATE * grads[path]
        )
        new_weights[path] = weights[path] + new_momenta[path]
    return new_weights, new_momenta


def assert_weights(model, expected, frozen):
    """Frozen variables bit-identical to `expected`, the others close to
    the NumPy step."""
    got = values(model)
    for path, value in expected.items():
        if path in frozen:
            np.testing.assert_array_equal(got[path], value, err_msg=path)
        else:
            np.testing.assert_allclose(
                got[path], value, rtol=1e-5, atol=1e-6, err_msg=path
            )
