import io
import statistics
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_sp import _keras_private
from keras_sp import fisher

# Brute force: a Python loop over examples and classes, one plain
# GradientTape per (example, class), in inference mode.


def squared_scores(model, x, outputs_are_probabilities, training=False):
    """G[i, k] = (d log f_k(x_i) / dw)^2, flattened over the trainable
    variables in order, and p[i, k] = f_k(x_i), both float64."""
    variables = model.trainable_variables
    rows, probabilities = [], []
    for i in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            outputs = model(x[i : i + 1], training=training)
            if outputs_are_probabilities:
                log_p = tf.math.log(outputs)[0]
            else:
                log_p = tf.nn.log_softmax(outputs)[0]
            scores = [log_p[k] for k in range(log_p.shape[0])]
        row = []
        for score in scores:
            gradients = tape.gradient(score, variables)
            row.append(
                np.concatenate(
                    [
                        np.ravel(g.numpy()).astype("float64") ** 2
                        for g in gradients
                    ]
                )
            )
        del tape
        rows.append(row)
        probabilities.append(np.exp(log_p.numpy().astype("float64")))
    return np.array(rows), np.array(probabilities)


def flat(result, model):
    return np.concatenate(
        [
            np.ravel(result[v.path]).astype("float64")
            for v in model.trainable_variables
        ]
    )


def assert_fisher_close(actual, expected, model, rtol=1e-5):
    """Equal to `rtol` relative, per variable (entries far below a
    variable's largest one are compared at rtol times that scale)."""
    start = 0
    for variable in model.trainable_variables:
        size = int(np.prod(variable.shape))
        a = actual[start : start + size]
        e = expected[start : start + size]
        scale = np.max(np.abs(e))
        np.testing.assert_allclose(
            a, e, rtol=rtol, atol=rtol * 1e-2 * scale, err_msg=variable.path
        )
        start += size


def dense_model(num_classes=3, activation="softmax", head_scale=3.0):
    inputs = keras.Input((7,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    h = keras.layers.Dropout(0.5, name="dropout")(h)
    outputs = keras.layers.Dense(
        num_classes, activation=activation, name="head"
    )(h)
    model = keras.Model(inputs, outputs, name="dense_net")
    kernel = model.get_layer("head").kernel
    kernel.assign(kernel * head_scale)  # a far-from-uniform prediction
    return model


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


def recover_counts(G, estimate, samples):
    """Label counts n[i, k] with estimate = sum_ik n_ik G_ik / (m S).

    Least squares finds the counts; they must be non-negative integers
    summing to S per example, and reproduce the estimate.
    """
    m, K, P = G.shape
    A = G.reshape(m * K, P).T
    counts = np.linalg.lstsq(A, estimate * m * samples, rcond=None)[0]
    counts = counts.reshape(m, K)
    rounded = np.round(counts)
    np.testing.assert_allclose(counts, rounded, atol=0.05)
    assert np.all(rounded >= 0)
    np.testing.assert_array_equal(rounded.sum(axis=1), samples)
    return rounded


def check_sampled(model, x, G, samples, **kwargs):
    """A sampled estimate is an average of squared scores of `samples`
    labels per example: brute force finds the labels' counts."""
    estimate = flat(
        fisher.diagonal_fisher(
            model, x, mode="sampled", samples=samples, **kwargs
        ),
        model,
    )
    counts = recover_counts(G, estimate, samples)
    expected = np.einsum("ik,ikj->j", counts, G) / (len(x) * samples)
    assert_fisher_close(estimate, expected, model)


def test_dense_model_every_mode_equals_brute_force():
    model = dense_model(3)  # a final softmax
    # 7 examples in batches of 3: the last batch is padded and masked.
    x, y = data((7,), 7, 3)
    G, p = squared_scores(model, x, outputs_are_probabilities=True)
    exact = fisher.diagonal_fisher(model, x, mode="exact", batch_size=3)
    assert_fisher_close(flat(exact, model), exact_from(G, p), model)
    empirical = fisher.diagonal_fisher(
        model, (x, y), mode="empirical", batch_size=3
    )
    assert_fisher_close(flat(empirical, model), empirical_from(G, y), model)
    # One draw per example; fewer draws than classes (one backward pass per
    # draw); more draws than classes (one per class, weighted by counts).
    for samples in (1, 2, 5):
        check_sampled(model, x, G, samples, batch_size=3, seed=7)


def test_conv_batchnorm_model_every_mode_equals_brute_force():
    model = conv_model(10)
    x, y = data((10, 10, 2), 5, 10)
    G, p = squared_scores(model, x, outputs_are_probabilities=False)
    # BatchNormalization's mode matters here: batch statistics differ (on a
    # copy: training mode updates the moving statistics).
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    G_training, _ = squared_scores(twin, x[:1], False, training=True)
    assert not np.allclose(G_training[0], G[0], rtol=1e-2)
    before = [np.array(v.numpy()) for v in model.weights]

    exact = fisher.diagonal_fisher(model, x, mode="exact", batch_size=3)
    assert_fisher_close(flat(exact, model), exact_from(G, p), model)
    empirical = fisher.diagonal_fisher(
        model, (x, y), mode="empirical", batch_size=3
    )
    assert_fisher_close(flat(empirical, model), empirical_from(G, y), model)
    check_sampled(model, x, G, 2, batch_size=3, seed=7)

    # Weights and BatchNormalization moving statistics are bit-identical.
    after = [np.array(v.numpy()) for v in model.weights]
    assert len(after) > len(model.trainable_variables)
    for variable, old, new in zip(model.weights, before, after, strict=True):
        np.testing.assert_array_equal(old, new, err_msg=variable.path)


def test_exact_in_class_chunks_equals_brute_force(monkeypatch):
    # At most 2 (example, class) pairs per call: 3 classes in 2 chunks.
    monkeypatch.setattr(fisher, "MAX_PAIRS", 2)
    model = dense_model(3, activation=None)
    x, _ = data((7,), 5, 3, seed=1)
    G, p = squared_scores(model, x, False)
    result = fisher.diagonal_fisher(model, x, mode="exact", batch_size=1)
    assert_fisher_close(flat(result, model), exact_from(G, p), model)


def test_squared_batch_gradient_would_fail():
    model = dense_model(4, activation=None)
    x, y = data((7,), 6, 4, seed=2)
    G, p = squared_scores(model, x, False)
    expected = empirical_from(G, y)
    assert_fisher_close(
        flat(fisher.diagonal_fisher(model, (x, y), mode="empirical"), model),
        expected,
        model,
    )
    # The shortcut: square the gradient of the batch's log-likelihood.
    with tf.GradientTape() as tape:
        log_p = tf.nn.log_softmax(model(x, training=False))
        mean = tf.reduce_mean(tf.gather(log_p, y, batch_dims=1))
    gradients = tape.gradient(mean, model.trainable_variables)
    mean_gradient = np.concatenate([np.ravel(g.numpy()) for g in gradients])
    for shortcut in (mean_gradient**2, len(x) * mean_gradient**2):
        with pytest.raises(AssertionError):
            assert_fisher_close(shortcut, expected, model)
    # For the exact Fisher the shortcut is 0: sum_k f_k d log f_k = d 1 = 0.
    with tf.GradientTape() as tape:
        log_p = tf.nn.log_softmax(model(x, training=False))
        expected_score = tf.reduce_mean(
            tf.reduce_sum(tf.stop_gradient(tf.exp(log_p)) * log_p, axis=1)
        )
    gradients = tape.gradient(expected_score, model.trainable_variables)
    shortcut = np.concatenate([np.ravel(g.numpy()) ** 2 for g in gradients])
    assert np.max(shortcut) < 1e-9 * np.max(exact_from(G, p))


def test_sampled_approaches_exact_within_its_standard_error():
    model = dense_model(10, activation=None)
    x, _ = data((7,), 24, 10, seed=3)
    G, p = squared_scores(model, x, False)
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


def test_seed_makes_sampled_reproducible():
    model = dense_model(4, activation=None, head_scale=0.5)
    x, _ = data((7,), 6, 4)
    run = lambda seed: flat(  # noqa: E731
        fisher.diagonal_fisher(model, x, mode="sampled", seed=seed), model
    )
    first = run(3)
    np.testing.assert_array_equal(first, run(3))
    assert not np.allclose(first, run(4))


def test_final_softmax_is_detected_and_read_as_logits():
    logits_model = dense_model(5, activation=None, head_scale=60.0)
    x, _ = data((7,), 6, 5)
    probabilities = ops.convert_to_numpy(
        ops.softmax(logits_model(x, training=False))
    )
    assert np.min(probabilities) == 0.0  # log(f) would be -inf here
    expected = flat(fisher.diagonal_fisher(logits_model, x), logits_model)
    assert np.all(np.isfinite(expected)) and np.max(expected) > 0
    np.testing.assert_array_equal(
        expected,
        flat(
            fisher.diagonal_fisher(logits_model, x, from_logits=True),
            logits_model,
        ),
    )
    dense_softmax = keras.Model(
        logits_model.inputs,
        keras.layers.Activation("softmax")(logits_model.outputs[0]),
    )
    softmax_layer = keras.Model(
        logits_model.inputs, keras.layers.Softmax()(logits_model.outputs[0])
    )
    for model, from_logits in (
        (dense_softmax, None),
        (dense_softmax, False),
        (softmax_layer, None),
    ):
        result = fisher.diagonal_fisher(model, x, from_logits=from_logits)
        assert_fisher_close(flat(result, model), expected, model)


def test_probabilities_without_softmax():
    logits_model = dense_model(4, activation=None)
    x, _ = data((7,), 6, 4)
    manual = keras.Model(
        logits_model.inputs,
        keras.layers.Lambda(
            lambda z: ops.exp(z) / ops.sum(ops.exp(z), axis=-1, keepdims=True)
        )(logits_model.outputs[0]),
    )
    with pytest.raises(
        ValueError, match="look like probabilities.*from_logits=None"
    ):
        fisher.diagonal_fisher(manual, x)
    expected = flat(fisher.diagonal_fisher(logits_model, x), logits_model)
    result = flat(fisher.diagonal_fisher(manual, x, from_logits=False), manual)
    # log of float32 probabilities instead of a log-softmax: ~1e-6 apart.
    assert_fisher_close(result, expected, manual, rtol=1e-4)
    with pytest.raises(ValueError, match="not.*Received: from_logits=False"):
        fisher.diagonal_fisher(logits_model, x, from_logits=False)


def test_data_forms_agree():
    model = dense_model(3, activation=None)
    x, y = data((7,), 7, 3)
    G, p = squared_scores(model, x, False)
    expected = exact_from(G, p)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    for form in (
        x,
        (x,),
        (x, y),
        tf.convert_to_tensor(x),
        dataset,
        dataset.map(lambda a, b: a),
        tf.data.Dataset.from_tensor_slices(x).batch(2),
    ):
        result = fisher.diagonal_fisher(model, form, batch_size=3)
        assert_fisher_close(flat(result, model), expected, model)
    first_five = exact_from(G[:5], p[:5])
    for form in (x, dataset):
        result = fisher.diagonal_fisher(
            model, form, batch_size=3, max_examples=5
        )
        assert_fisher_close(flat(result, model), first_five, model)
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
    b = keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(h))
    rng = np.random.default_rng(0)
    x = {
        "a": rng.normal(size=(5, 3)).astype("float32"),
        "b": rng.normal(size=(5, 2)).astype("float32"),
    }
    result = flat(fisher.diagonal_fisher(model, x, batch_size=2), model)
    concatenated = np.concatenate([x["a"], x["b"]], axis=1)
    twin = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    twin.set_weights(model.get_weights())
    G, p = squared_scores(twin, concatenated, False)
    assert_fisher_close(result, exact_from(G, p), model)


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
        (dict(data=x, mode="empirical"), "labels.*data without labels"),
        (dict(data=(x,), mode="empirical"), "data without labels"),
        (
            dict(data=(x, np.array([0, 1, 3, 2])), mode="empirical"),
            r"\[0, 3\).*3",
        ),
        (dict(data=(x, np.array([0, -1, 2, 2])), mode="empirical"), "-1"),
        (dict(data=(x, y + 0.5), mode="empirical"), "integer"),
        (dict(data=(x, np.full((4, 3), 1 / 3)), mode="empirical"), "one-hot"),
        (dict(data=(x, y[:3])), "same number of examples"),
        (dict(data=(x, y, np.ones(4))), "sample weights"),
        (dict(data=tf.data.Dataset.from_tensor_slices(x)), "must be batched"),
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
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="TensorFlow.*backend='jax'"):
        fisher.diagonal_fisher(one_unit, x)


def test_keras_records_the_logits_of_a_softmax():
    # `_keras_private.keras_logits` relies on this (traced tensors only).
    found = []

    @tf.function
    def call(logits):
        probabilities = keras.activations.softmax(logits)
        found.append(_keras_private.keras_logits(probabilities) is logits)
        return probabilities

    call(tf.ones((1, 3)))
    assert found == [True]
    assert _keras_private.keras_logits(tf.ones((1, 3))) is None
