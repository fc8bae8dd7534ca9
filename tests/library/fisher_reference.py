"""References for the tests of `keras_sp.fisher`, on every backend.

NumPy closed forms of the per-example scores of a small network (eq. 4 of
Li, Grandvalet & Davoine: F_jj = 1/m sum_i sum_k f_k(x_i)
(d log f_k(x_i) / dw_j)^2), and, for convolutions, a plain loop of one
backward pass per (example, class) on the backend.
"""

import os

import keras
import numpy as np
from keras import ops

from keras_sp import fisher

BACKEND = keras.backend.backend()
TESTS = os.path.dirname(os.path.abspath(__file__))


def flat(result, model):
    return np.concatenate(
        [
            np.ravel(result[v.path]).astype("float64")
            for v in model.trainable_variables
        ]
    )


def assert_fisher_close(actual, expected, model, rtol=1e-5, what=""):
    """Equal to `rtol` relative, per variable (entries far below a
    variable's largest one are compared at rtol times that scale)."""
    start = 0
    for variable in model.trainable_variables:
        size = int(np.prod(variable.shape))
        a = actual[start : start + size]
        e = expected[start : start + size]
        scale = np.max(np.abs(e))
        np.testing.assert_allclose(
            a,
            e,
            rtol=rtol,
            atol=rtol * 1e-2 * scale,
            err_msg=f"{what} {variable.path}",
        )
        start += size
    assert start == len(expected)


def dense_model(num_classes=3, activation="softmax", head_scale=3.0, seed=0):
    """Dense(8, tanh) -> Dropout -> Dense(K): weights from NumPy, the same
    on every backend."""
    inputs = keras.Input((7,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    h = keras.layers.Dropout(0.5, name="dropout")(h)
    outputs = keras.layers.Dense(
        num_classes, activation=activation, name="head"
    )(h)
    model = keras.Model(inputs, outputs, name="dense_net")
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            rng.normal(0, 0.5, (7, 8)),
            rng.normal(0, 0.2, 8),
            rng.normal(0, 0.5 * head_scale, (8, num_classes)),
            rng.normal(0, 0.2, num_classes),
        ]
    )
    return model


def closed_form(model, x):
    """G[i, k] = (d log f_k(x_i) / dw)^2 and p[i, k] = f_k(x_i) of
    `dense_model` in NumPy (float64), flattened in the order of
    `model.trainable_variables`: with h = tanh(x W1 + b1) and
    z = h W2 + b2, d log f_k / dz = e_k - p, dW2 = h (e_k - p)^T,
    dW1 = x ((W2 (e_k - p)) * (1 - h^2))^T."""
    W1, b1, W2, b2 = [np.asarray(w, "float64") for w in model.get_weights()]
    x = np.asarray(x, "float64")
    h = np.tanh(x @ W1 + b1)
    z = h @ W2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    K = p.shape[1]
    G = []
    for i in range(len(x)):
        row = []
        for k in range(K):
            d = np.eye(K)[k] - p[i]
            a = (W2 @ d) * (1 - h[i] ** 2)
            parts = [np.outer(x[i], a), a, np.outer(h[i], d), d]
            row.append(np.concatenate([np.ravel(q) for q in parts]) ** 2)
        G.append(row)
    return np.array(G), p


def backprop(model, x, training=False):
    """G and p by brute force: one plain backward pass per (example, class)
    on the backend, no vectorisation (`model` is not changed)."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def log_p(values, x1):
        outputs, _ = model.stateless_call(
            values, non_trainable, x1, training=training
        )
        return ops.log_softmax(ops.cast(outputs, "float32"), axis=-1)[0]

    if BACKEND == "tensorflow":
        import tensorflow as tf

        def gradient(x1, k):
            values = [tf.convert_to_tensor(t) for t in trainable]
            with tf.GradientTape() as tape:
                tape.watch(values)
                score = log_p(values, x1)[k]
            return tape.gradient(score, values)
    elif BACKEND == "jax":
        import jax

        compiled = jax.jit(jax.grad(lambda t, x1, k: log_p(t, x1)[k]))

        def gradient(x1, k):
            return compiled(trainable, x1, k)
    else:
        import torch

        def gradient(x1, k):
            values = [t.detach().requires_grad_(True) for t in trainable]
            return torch.autograd.grad(log_p(values, x1)[k], values)

    G, p = [], []
    for i in range(len(x)):
        x1 = x[i : i + 1]
        log_probabilities = ops.convert_to_numpy(log_p(trainable, x1))
        p.append(np.exp(log_probabilities.astype("float64")))
        G.append(
            [
                np.concatenate(
                    [
                        np.ravel(ops.convert_to_numpy(g)).astype("float64")
                        for g in gradient(x1, k)
                    ]
                )
                ** 2
                for k in range(len(log_probabilities))
            ]
        )
    return np.array(G), np.array(p)


def backprop_signed(model, x, y):
    """The per-example gradients of log f_{y_i}(x_i) (signed), NumPy."""
    W1, b1, W2, b2 = [np.asarray(w, "float64") for w in model.get_weights()]
    h = np.tanh(x.astype("float64") @ W1 + b1)
    z = h @ W2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    rows = []
    for i in range(len(x)):
        d = np.eye(p.shape[1])[y[i]] - p[i]
        a = (W2 @ d) * (1 - h[i] ** 2)
        parts = [np.outer(x[i], a), a, np.outer(h[i], d), d]
        rows.append(np.concatenate([np.ravel(q) for q in parts]))
    return np.array(rows)


def conv_model(num_classes=10):
    """Strided (with uneven "same" padding), dilated, depthwise and 1x1
    convolutions, with BatchNormalization whose moving statistics differ
    from any batch's."""
    inputs = keras.Input((10, 10, 2))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv1")(
        inputs
    )
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(
        5, 3, dilation_rate=2, padding="same", use_bias=False, name="conv2"
    )(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="valid", name="depthwise")(x)
    x = keras.layers.Conv2D(6, 1, strides=2, padding="valid", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(num_classes, name="head")(x)
    model = keras.Model(inputs, outputs, name="conv_net")
    rng = np.random.default_rng(5)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        shape = layer.moving_mean.shape
        layer.moving_mean.assign(rng.normal(0.0, 0.5, shape))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
        layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
        layer.beta.assign(rng.normal(0.0, 0.3, shape))
    return model


def data(shape, count, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count,) + shape).astype("float32")
    y = rng.integers(0, num_classes, count)
    return x, y


def exact_from(G, p):
    return np.einsum("ik,ikj->j", p, G) / len(G)


def empirical_from(G, y):
    return G[np.arange(len(G)), y].mean(axis=0)


def sampled_from(G, p, samples, seed):
    """The documented draws: `samples` uniforms per example, in order,
    from numpy.random.default_rng(seed), inverted through the cumulative
    distribution f(x_i); the average of the drawn labels' squared scores."""
    uniforms = np.random.default_rng(seed).random((len(p), samples))
    total = np.zeros(G.shape[2])
    for i in range(len(p)):
        cumulative = np.cumsum(p[i])
        for u in uniforms[i]:
            label = min(
                int(np.searchsorted(cumulative, u * cumulative[-1], "right")),
                len(cumulative) - 1,
            )
            total += G[i, label]
    return total / (len(p) * samples)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(x)


def three_modes():
    """The three modes on a conv model whose weights come from NumPy, for
    one data set and seed, as lists (JSON)."""
    model = conv_model(10)
    rng = np.random.default_rng(3)
    for variable in model.trainable_variables:
        variable.assign(rng.normal(0, 0.5, variable.shape))
    x, y = data((10, 10, 2), 6, 10)
    return {
        mode: flat(
            fisher.diagonal_fisher(
                model, (x, y), mode=mode, samples=3, seed=5, batch_size=4
            ),
            model,
        ).tolist()
        for mode in ("exact", "sampled", "empirical")
    }
