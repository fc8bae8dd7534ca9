"""`keras_sp.fisher` on every backend: run with KERAS_BACKEND=tensorflow,
jax or torch. References: NumPy closed forms of the per-example scores of
a small network (eq. 4 of Li, Grandvalet & Davoine: F_jj = 1/m sum_i
sum_k f_k(x_i) (d log f_k(x_i) / dw_j)^2), and, for convolutions, a plain
loop of one backward pass per (example, class)."""

import io
import json
import os
import statistics
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
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


def test_closed_form_equals_backprop():
    # The NumPy closed form is checked once against the backend's autodiff.
    model = dense_model(4, activation=None)
    x, _ = data((7,), 3, 4)
    G, p = closed_form(model, x)
    G_backprop, p_backprop = backprop(model, x)
    np.testing.assert_allclose(p_backprop, p, rtol=1e-5)
    np.testing.assert_allclose(G_backprop, G, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("activation", ["softmax", None])
def test_dense_model_every_mode_equals_closed_form(activation):
    model = dense_model(3, activation=activation)
    # 7 examples in batches of 3: the last batch is padded and masked.
    x, y = data((7,), 7, 3)
    G, p = closed_form(model, x)
    exact = fisher.diagonal_fisher(model, x, mode="exact", batch_size=3)
    assert_fisher_close(flat(exact, model), exact_from(G, p), model)
    empirical = fisher.diagonal_fisher(
        model, (x, y), mode="empirical", batch_size=3
    )
    assert_fisher_close(flat(empirical, model), empirical_from(G, y), model)
    # One draw per example; fewer draws than classes (one backward pass per
    # draw); more draws than classes (one per class, weighted by counts).
    for samples in (1, 2, 5):
        result = fisher.diagonal_fisher(
            model, x, mode="sampled", samples=samples, batch_size=3, seed=7
        )
        expected = sampled_from(G, p, samples, seed=7)
        assert_fisher_close(flat(result, model), expected, model)
        assert not np.allclose(expected, exact_from(G, p), rtol=1e-3)


def test_conv_batchnorm_model_every_mode_equals_backprop():
    model = conv_model(10)
    x, y = data((10, 10, 2), 5, 10)
    G, p = backprop(model, x)
    # BatchNormalization's mode matters here: batch statistics differ.
    G_training, _ = backprop(model, x[:2], training=True)
    assert not np.allclose(G_training[0], G[0], rtol=1e-2)
    before = [np.array(ops.convert_to_numpy(v)) for v in model.weights]

    exact = fisher.diagonal_fisher(model, x, mode="exact", batch_size=3)
    assert_fisher_close(flat(exact, model), exact_from(G, p), model)
    empirical = fisher.diagonal_fisher(
        model, (x, y), mode="empirical", batch_size=3
    )
    assert_fisher_close(flat(empirical, model), empirical_from(G, y), model)
    sampled = fisher.diagonal_fisher(
        model, x, mode="sampled", samples=2, batch_size=3, seed=7
    )
    expected = sampled_from(G, p, 2, seed=7)
    assert_fisher_close(flat(sampled, model), expected, model)

    # Weights and BatchNormalization moving statistics are bit-identical.
    after = [np.array(ops.convert_to_numpy(v)) for v in model.weights]
    assert len(after) > len(model.trainable_variables)
    for variable, old, new in zip(model.weights, before, after, strict=True):
        np.testing.assert_array_equal(old, new, err_msg=variable.path)


def test_exact_in_class_chunks_equals_closed_form(monkeypatch):
    # At most 2 (example, class) pairs per call: 3 classes in 2 chunks.
    monkeypatch.setattr(fisher, "MAX_PAIRS", 2)
    model = dense_model(3, activation=None)
    x, _ = data((7,), 5, 3, seed=1)
    G, p = closed_form(model, x)
    result = fisher.diagonal_fisher(model, x, mode="exact", batch_size=1)
    assert_fisher_close(flat(result, model), exact_from(G, p), model)


def test_squared_batch_gradient_would_fail():
    model = dense_model(4, activation=None)
    x, y = data((7,), 6, 4, seed=2)
    G, p = closed_form(model, x)
    expected = empirical_from(G, y)
    assert_fisher_close(
        flat(fisher.diagonal_fisher(model, (x, y), mode="empirical"), model),
        expected,
        model,
    )
    # The shortcut: square the gradient of the batch's log-likelihood (the
    # signed per-example gradients come from the closed form's roots).
    signed = backprop_signed(model, x, y)
    for shortcut in (signed.mean(0) ** 2, len(x) * signed.mean(0) ** 2):
        with pytest.raises(AssertionError):
            assert_fisher_close(shortcut, expected, model)


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


def test_sampled_approaches_exact_within_its_standard_error():
    model = dense_model(10, activation=None)
    x, _ = data((7,), 24, 10, seed=3)
    G, p = closed_form(model, x)
    m = len(x)
    exact = exact_from(G, p)
    # Variance of one draw's squared score, per example and parameter.
    per_draw_variance = np.einsum("ik,ikj->ij", p, G**2) - (
        np.einsum("ik,ikj->ij", p, G) ** 2
    )
    # Bonferroni over the parameters, family-wise error 1e-3.
    z = statistics.NormalDist().inv_cdf(1 - 1e-3 / (2 * exact.size))
    uniform = G.mean(axis=1).mean(axis=0)  # a sampler ignoring f(x)
    for samples in (9, 400):  # draws < K, and counts over K classes
        estimate = flat(
            fisher.diagonal_fisher(
                model, x, mode="sampled", samples=samples, seed=11
            ),
            model,
        )
        standard_error = np.sqrt(
            per_draw_variance.sum(axis=0) / (m**2 * samples)
        )
        tolerance = z * standard_error + 1e-5 * exact
        assert np.all(np.abs(estimate - exact) <= tolerance)
        # The same tolerance rejects labels drawn uniformly.
        assert not np.all(np.abs(uniform - exact) <= tolerance)


def test_seed_makes_sampled_reproducible_for_every_batch_size():
    model = dense_model(4, activation=None, head_scale=0.5)
    x, _ = data((7,), 6, 4)

    def run(seed, batch_size=32):
        return flat(
            fisher.diagonal_fisher(
                model, x, mode="sampled", seed=seed, batch_size=batch_size
            ),
            model,
        )

    first = run(3)
    np.testing.assert_array_equal(first, run(3))
    # The draws of an example do not depend on the batch it falls in.
    np.testing.assert_allclose(run(3, batch_size=4), first, rtol=1e-6)
    assert not np.allclose(first, run(4))


def test_final_softmax_is_detected_and_read_as_logits():
    logits_model = dense_model(5, activation=None, head_scale=60.0)
    x, _ = data((7,), 6, 5)
    probabilities = ops.convert_to_numpy(
        ops.softmax(logits_model(x, training=False))
    )
    assert np.min(probabilities) == 0.0  # log(f) would be -inf here
    G, p = closed_form(logits_model, x)
    expected = exact_from(G, p)
    assert np.all(np.isfinite(expected)) and np.max(expected) > 0
    assert_fisher_close(
        flat(fisher.diagonal_fisher(logits_model, x), logits_model),
        expected,
        logits_model,
    )
    head = logits_model.get_layer("head")
    dense_softmax = keras.Model(
        logits_model.input,
        keras.layers.Activation("softmax")(logits_model.outputs[0]),
    )
    softmax_layer = keras.Model(
        logits_model.input, keras.layers.Softmax()(logits_model.outputs[0])
    )
    nested = keras.Sequential(
        [
            keras.Input((7,)),
            keras.Sequential([logits_model, keras.layers.Softmax()]),
        ]
    )
    head_activation = dense_model(5, activation="softmax", head_scale=60.0)
    for model, from_logits in (
        (dense_softmax, None),
        (dense_softmax, False),
        (softmax_layer, None),
        (nested, None),
        (head_activation, None),
        (head_activation, False),
    ):
        result = fisher.diagonal_fisher(model, x, from_logits=from_logits)
        assert_fisher_close(flat(result, model), expected, model)
    # The softmax is back in place afterwards.
    np.testing.assert_allclose(
        ops.convert_to_numpy(head_activation(x, training=False)),
        probabilities,
        atol=1e-6,
    )
    assert head.activation is keras.activations.linear
    # With from_logits=True the softmax outputs are taken as logits.
    result = flat(
        fisher.diagonal_fisher(dense_softmax, x, from_logits=True),
        dense_softmax,
    )
    assert not np.allclose(result, expected, rtol=1e-2)


def test_probabilities_without_softmax():
    logits_model = dense_model(4, activation=None)
    x, _ = data((7,), 6, 4)
    manual = keras.Model(
        logits_model.input,
        keras.layers.Lambda(
            lambda z: ops.exp(z) / ops.sum(ops.exp(z), axis=-1, keepdims=True)
        )(logits_model.outputs[0]),
    )
    with pytest.raises(
        ValueError, match="look like probabilities.*from_logits=None"
    ):
        fisher.diagonal_fisher(manual, x)
    G, p = closed_form(logits_model, x)
    result = flat(fisher.diagonal_fisher(manual, x, from_logits=False), manual)
    # log of float32 probabilities instead of a log-softmax: ~1e-6 apart.
    assert_fisher_close(result, exact_from(G, p), manual, rtol=1e-4)
    with pytest.raises(ValueError, match="not.*Received: from_logits=False"):
        fisher.diagonal_fisher(logits_model, x, from_logits=False)


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, index):
        part = slice(index * self.size, (index + 1) * self.size)
        return self.x[part], self.y[part]


def data_forms(x, y):
    """The same examples in every form `data` takes, by name."""
    import tensorflow as tf
    import torch

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    pairs = torch.utils.data.TensorDataset(
        torch.from_numpy(x), torch.from_numpy(y)
    )

    def generator():
        for start in range(0, len(x), 2):
            yield x[start : start + 2], y[start : start + 2]

    forms = {
        "array": x,
        "(x,)": (x,),
        "(x, y)": (x, y),
        "tf tensor": tf.convert_to_tensor(x),
        "torch tensor": torch.from_numpy(x),
        "tf.data (x, y)": dataset,
        "tf.data x": dataset.map(lambda a, b: a),
        "DataLoader [x, y]": torch.utils.data.DataLoader(pairs, batch_size=3),
        "DataLoader x": torch.utils.data.DataLoader(
            torch.from_numpy(x), batch_size=5
        ),
        "generator": generator(),
        "iterator": iter([(x[:4], y[:4]), (x[4:], y[4:])]),
        "PyDataset": Batches(x, y, 3),
    }
    if BACKEND == "jax":
        import jax.numpy as jnp

        forms["jax array"] = jnp.asarray(x)
    return forms


def test_data_forms_agree():
    model = dense_model(3, activation=None)
    x, y = data((7,), 7, 3)
    G, p = closed_form(model, x)
    for name, form in data_forms(x, y).items():
        result = fisher.diagonal_fisher(model, form, batch_size=3)
        assert_fisher_close(
            flat(result, model), exact_from(G, p), model, what=name
        )
    first_five = exact_from(G[:5], p[:5])
    for name, form in data_forms(x, y).items():
        result = fisher.diagonal_fisher(
            model, form, batch_size=3, max_examples=5
        )
        assert_fisher_close(flat(result, model), first_five, model, what=name)
    for name in ("(x, y)", "tf.data (x, y)", "DataLoader [x, y]", "generator"):
        result = fisher.diagonal_fisher(
            model, data_forms(x, y)[name], mode="empirical", batch_size=3
        )
        assert_fisher_close(flat(result, model), empirical_from(G, y), model)
    one_hot = np.eye(3)[y]
    assert_fisher_close(
        flat(
            fisher.diagonal_fisher(model, (x, one_hot), mode="empirical"), model
        ),
        empirical_from(G, y),
        model,
    )


def test_several_inputs_as_a_dict():
    a = keras.Input((3,), name="a")
    b = keras.Input((4,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(h)
    h = keras.layers.Dropout(0.5, name="dropout")(h)
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(3, name="head")(h))
    twin = dense_model(3, activation=None)
    model.set_weights(twin.get_weights())
    x, _ = data((7,), 5, 3)
    inputs = {"a": x[:, :3], "b": x[:, 3:]}
    G, p = closed_form(twin, x)
    result = flat(fisher.diagonal_fisher(model, inputs, batch_size=2), model)
    assert_fisher_close(result, exact_from(G, p), model)
    with pytest.raises(ValueError, match=r"keyed by the inputs.*\['a', 'b'\]"):
        fisher.diagonal_fisher(model, {"a": x[:, :3], "c": x[:, 3:]})
    with pytest.raises(ValueError, match=r"input 'b'.*\(None, 4\).*\(5, 3\)"):
        fisher.diagonal_fisher(model, {"a": x[:, :3], "b": x[:, 4:]})


def test_wrong_input_shape_names_expected_and_received_shapes():
    import tensorflow as tf
    import torch

    functional = dense_model(3, activation=None)
    sequential = keras.Sequential(
        [keras.Input((7,)), keras.layers.Dense(3)], name="sequential_net"
    )
    x, y = data((5,), 4, 3)  # 5 features for a model that takes 7

    def generator():
        yield x[:2], y[:2]
        yield x[2:], y[2:]

    pairs = torch.utils.data.TensorDataset(
        torch.from_numpy(x), torch.from_numpy(y)
    )
    forms = {
        "array": (lambda: x, r"\(4, 5\)"),
        "(x, y)": (lambda: (x, y), r"\(4, 5\)"),
        "tf.data": (
            lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(3),
            r"\(3, 5\)",
        ),
        "generator": (generator, r"\(2, 5\)"),
        "DataLoader": (
            lambda: torch.utils.data.DataLoader(pairs, batch_size=3),
            r"\(3, 5\)",
        ),
    }
    for model in (functional, sequential):
        for make, received in forms.values():
            for mode in ("exact", "empirical"):
                with pytest.raises(
                    ValueError,
                    match=rf"'{model.name}'.*expects inputs of shape "
                    rf"\(None, 7\).*received a batch of shape {received}",
                ):
                    fisher.diagonal_fisher(model, make(), mode=mode)
    # A later batch of the wrong shape is caught too.
    good, _ = data((7,), 4, 3)

    def mixed():
        yield good
        yield x

    with pytest.raises(ValueError, match=r"\(None, 7\).*\(4, 5\)"):
        fisher.diagonal_fisher(functional, mixed())
    # An unbatched iterable is one axis short.
    with pytest.raises(ValueError, match=r"\(7,\).*one axis short"):
        fisher.diagonal_fisher(functional, iter(list(good)))


def test_progress_bar(capsys):
    model = dense_model(3, activation=None)
    x, _ = data((7,), 7, 3)
    fisher.diagonal_fisher(model, x, batch_size=3, verbose=1)
    assert "7/7" in capsys.readouterr().out
    fisher.diagonal_fisher(model, x, batch_size=3, verbose=0)
    assert capsys.readouterr().out == ""


def test_save_load_round_trip(tmp_path):
    model = dense_model(3)
    x, _ = data((7,), 3, 3)
    result = fisher.diagonal_fisher(model, x)
    assert any("/" in key for key in result)
    path = tmp_path / "fisher.npz"
    fisher.save(result, path)
    for loaded in (fisher.load(path), fisher.load(str(path), model=model)):
        assert list(loaded) == list(result)
        for key, value in result.items():
            assert loaded[key].dtype == value.dtype
            np.testing.assert_array_equal(loaded[key], value)
    with np.load(path) as archive:  # a plain .npz file
        assert sorted(archive.files) == sorted(result)
    with pytest.raises(ValueError, match="exists and overwrite=False"):
        fisher.save(result, path, overwrite=False)
    fisher.save({"a/b": np.ones(2)}, path)
    assert list(fisher.load(path)) == ["a/b"]
    assert [p.name for p in tmp_path.iterdir()] == ["fisher.npz"]


def test_file_that_does_not_match_the_model(tmp_path):
    model = dense_model(3)
    path = tmp_path / "fisher.npz"
    result = {
        v.path: np.ones(v.shape, "float32") for v in model.trainable_variables
    }
    renamed = dict(result)
    renamed["other/kernel"] = renamed.pop("head/kernel")
    fisher.save(renamed, path)
    with pytest.raises(ValueError, match="does not match model.*head/kernel"):
        fisher.load(path, model=model)
    # Paths match up to a '/'-aligned prefix (a reloaded or nested model).
    prefixed = {"source/" + key: value for key, value in result.items()}
    fisher.save(prefixed, path)
    assert list(fisher.load(path, model=model)) == list(result)
    prefixed["hidden/kernel"] = result["hidden/kernel"]
    fisher.save(prefixed, path)
    with pytest.raises(ValueError, match="1 entries match no.*source/hidden"):
        fisher.load(path, model=model)
    prefixed["other/hidden/kernel"] = prefixed.pop("hidden/kernel")
    fisher.save(prefixed, path)
    with pytest.raises(ValueError, match="several entries.*hidden/kernel"):
        fisher.load(path, model=model)
    reshaped = dict(result)
    reshaped["head/kernel"] = np.ones((3, 8), "float32")
    fisher.save(reshaped, path)
    with pytest.raises(ValueError, match=r"'head/kernel' has shape \(3, 8\)"):
        fisher.load(path, model=model)
    with pytest.raises(ValueError, match="end in '.npz'"):
        fisher.save(result, tmp_path / "fisher.npy")
    with pytest.raises(ValueError, match="non-negative"):
        fisher.save({"head/bias": -np.ones(3)}, path)
    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(ValueError, match="single array"):
        fisher.load(tmp_path / "single.npy")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a .npz file"):
        fisher.load(tmp_path / "text.npz")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        with archive.open("head/bias.npy", "w") as handle:
            np.lib.format.write_array(handle, -np.ones(3))
    (tmp_path / "negative.npz").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="non-negative"):
        fisher.load(tmp_path / "negative.npz")
    with pytest.raises(FileNotFoundError):
        fisher.load(tmp_path / "missing.npz")


def test_bad_inputs():
    import tensorflow as tf

    model = dense_model(3, activation=None)
    x, y = data((7,), 4, 3)
    empty = np.zeros((0, 7), "float32")
    cases = [
        (dict(data=empty), "empty"),
        (dict(data=(empty, np.zeros(0))), "empty"),
        (
            dict(data=tf.data.Dataset.from_tensor_slices(empty).batch(2)),
            "empty",
        ),
        (dict(data=iter([])), "empty"),
        (dict(data=x, mode="empirical"), "labels.*data without labels"),
        (dict(data=(x,), mode="empirical"), "data without labels"),
        (dict(data=iter([x]), mode="empirical"), "data without labels"),
        (
            dict(data=(x, np.array([0, 1, 3, 2])), mode="empirical"),
            r"\[0, 3\).*3",
        ),
        (dict(data=(x, np.array([0, -1, 2, 2])), mode="empirical"), "-1"),
        (dict(data=(x, y + 0.5), mode="empirical"), "integer"),
        (dict(data=(x, np.full((4, 3), 1 / 3)), mode="empirical"), "one-hot"),
        (dict(data=(x, y[:3])), "same number of examples"),
        (dict(data=(x, y, np.ones(4))), "sample weights"),
        (dict(data=iter([(x, y, np.ones(4))])), "sample weights"),
        (dict(data=tf.data.Dataset.from_tensor_slices(x)), "must be batched"),
        (dict(data=[x, x]), r"takes 1 input\(s\).*2 input array"),
        (dict(data=x, mode="sampled", samples=0), "samples=0"),
        (dict(data=x, mode="sampled", samples=1.5), "samples=1.5"),
        (dict(data=x, mode="fisher"), "mode='fisher'"),
        (dict(data=x, from_logits="yes"), "from_logits='yes'"),
        (dict(data=x, batch_size=0), "batch_size=0"),
        (dict(data=x, max_examples=0), "max_examples=0"),
        (dict(data=x, verbose=3), "verbose=3"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            fisher.diagonal_fisher(model, **arguments)
    dataset = tf.data.Dataset.from_tensor_slices((x, y + 3)).batch(2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fisher.diagonal_fisher(model, dataset, mode="empirical")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(x)


def test_models_that_are_not_one_classifier(monkeypatch):
    x, _ = data((7,), 4, 3)
    inputs = keras.Input((7,))
    two_outputs = keras.Model(
        inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(2)(inputs)]
    )
    one_unit = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    sequence = keras.Model(
        inputs, keras.layers.Reshape((7, 1))(keras.layers.Dense(7)(inputs))
    )
    sigmoid = keras.Model(
        inputs, keras.layers.Dense(3, activation="sigmoid")(inputs)
    )
    frozen = keras.Model(inputs, keras.layers.Dense(3, trainable=False)(inputs))
    subclassed = Subclassed()
    subclassed(x)
    for model, message in (
        (two_outputs, "one output.*2 outputs"),
        (one_unit, r"shape \(4, 1\)"),
        (sequence, r"shape \(4, 7, 1\)"),
        (sigmoid, "sigmoid"),
        (frozen, "no trainable variables"),
        (keras.Sequential([keras.layers.Dense(3)]), "not built"),
        ("model.keras", "keras.Model"),
    ):
        with pytest.raises(ValueError, match=message):
            fisher.diagonal_fisher(model, x)
    # A subclassed model has no declared input shape: the error of its
    # call is reported with the shape received.
    with pytest.raises(ValueError, match=r"(?s)'subclassed'.*\[\(4, 5\)\]"):
        fisher.diagonal_fisher(subclassed, x[:, :5])
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(ValueError, match="KERAS_BACKEND.*backend='numpy'"):
        fisher.diagonal_fisher(one_unit, x)


def test_subclassed_model_equals_closed_form():
    model = Subclassed()
    model(np.zeros((1, 7), "float32"))
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(7, 3)), rng.normal(size=3)]
    model.set_weights(weights)
    x, y = data((7,), 5, 3)
    z = x.astype("float64") @ weights[0] + weights[1]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    # Softmax regression: d log f_k / dW = x (e_k - p)^T, d / db = e_k - p.
    G = np.array(
        [
            [
                np.concatenate(
                    [
                        np.outer(x[i], np.eye(3)[k] - p[i]).ravel(),
                        np.eye(3)[k] - p[i],
                    ]
                )
                ** 2
                for k in range(3)
            ]
            for i in range(len(x))
        ]
    )
    for mode, expected in (
        ("exact", exact_from(G, p)),
        ("empirical", empirical_from(G, y)),
        ("sampled", sampled_from(G, p, 3, seed=2)),
    ):
        result = fisher.diagonal_fisher(
            model, (x, y), mode=mode, samples=3, seed=2, batch_size=2
        )
        assert_fisher_close(flat(result, model), expected, model)


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


_ON_BACKEND = """
import json, sys
sys.path.insert(0, {tests!r})
import fisher_test
print(json.dumps(fisher_test.three_modes()))
"""


def three_modes_on(backend):
    """`three_modes()` computed in a subprocess running `backend`."""
    environment = dict(os.environ, KERAS_BACKEND=backend)
    environment["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(fisher.__file__))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    finished = subprocess.run(
        [
            sys.executable,
            "-c",
            _ON_BACKEND.format(tests=os.path.dirname(__file__)),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_every_backend_gives_the_same_fisher():
    # The same weights, data and seed on TensorFlow, JAX and PyTorch: the
    # same Fisher in every mode (the sampled labels are drawn on the host).
    # This backend runs here, the two others in subprocesses.
    results = {BACKEND: three_modes()}
    for backend in ("tensorflow", "jax", "torch"):
        if backend != BACKEND:
            results[backend] = three_modes_on(backend)
    model = conv_model(10)
    for mode in ("exact", "sampled", "empirical"):
        reference = np.array(results[BACKEND][mode])
        assert np.max(reference) > 0
        for backend, result in results.items():
            assert_fisher_close(
                np.array(result[mode]), reference, model, what=backend
            )
    exact = np.array(results[BACKEND]["exact"])
    assert not np.allclose(np.array(results[BACKEND]["sampled"]), exact)


@pytest.mark.skipif(
    BACKEND != "torch", reason="the per-example loop is PyTorch's fallback"
)
def test_torch_falls_back_to_a_loop_when_torch_func_fails(monkeypatch):
    from keras_sp import _fisher_torch

    def fail(*arguments):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(_fisher_torch._Functions, "_vectorised_sums", fail)
    model = dense_model(3, activation=None, seed=4)
    x, y = data((7,), 5, 3)
    G, p = closed_form(model, x)
    with pytest.warns(RuntimeWarning, match="no batching rule.*loop"):
        exact = fisher.diagonal_fisher(model, x, batch_size=2)
    assert_fisher_close(flat(exact, model), exact_from(G, p), model)
    for mode, expected in (
        ("empirical", empirical_from(G, y)),
        ("sampled", sampled_from(G, p, 2, seed=1)),
    ):
        result = fisher.diagonal_fisher(
            model, (x, y), mode=mode, samples=2, seed=1, batch_size=2
        )
        assert_fisher_close(flat(result, model), expected, model)
