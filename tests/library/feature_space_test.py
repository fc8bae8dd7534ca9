"""FeatureRegularized and its terms against NumPy closed forms.

DELTA: Li et al. (ICLR 2019), Eq. 3-4 with the normalisation of the
authors' `reg_att_fea_map`; BSS: Chen et al. (NeurIPS 2019), Eq. 5; LwF:
Li & Hoiem (2016), Eq. 2 with T = 2; Co-Tuning: You et al. (NeurIPS 2020),
Eq. 4-5. L2-SP: Li, Grandvalet & Davoine (2018), Eq. 3.
"""

import keras
import numpy as np
import pytest
from backend import to_numpy
from backend import value_and_gradients

import keras_sp
from keras_sp import feature_space as fs

RTOL = 1e-5


def dense_model(seed=0):
    """inputs (5) -> hidden (7, tanh) -> features (4, tanh) -> head (3)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(7, activation="tanh", name="hidden")(inputs)
    f = keras.layers.Dense(4, activation="tanh", name="features")(h)
    outputs = keras.layers.Dense(3, name="head")(f)
    return keras.Model(inputs, outputs, name="net")


def conv_model(seed=0):
    """A small CNN with BatchNormalization, nested in a Sequential."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    backbone = keras.Model(inputs, x, name="backbone")
    return keras.Sequential(
        [keras.Input((6, 6, 2)), backbone, keras.layers.Dense(3, name="head")],
        name="cnn",
    )


def source_head(inputs=4, classes=5, seed=3):
    keras.utils.set_random_seed(seed)
    head = keras.layers.Dense(classes, name="source")
    head.build((None, inputs))
    return head


def relationship(target=3, source=5, seed=4):
    table = np.random.default_rng(seed).uniform(0.1, 1.0, (target, source))
    return (table / table.sum(1, keepdims=True)).astype("float32")


def dense_data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), np.arange(n) % 3


def conv_data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 2)).astype("float32"), np.arange(n) % 3


def weights_of(layer):
    return {v.path: to_numpy(v) for v in layer.weights}


def perturb(model, scale=0.3, seed=7):
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        variable.assign(
            to_numpy(variable) + scale * rng.normal(size=variable.shape)
        )


def numpy_forward(weights, x):
    """The dense model's hidden, features and logits, in NumPy."""
    h = np.tanh(x @ weights["hidden/kernel"] + weights["hidden/bias"])
    f = np.tanh(h @ weights["features/kernel"] + weights["features/bias"])
    return h, f, f @ weights["head/kernel"] + weights["head/bias"]


def short(weights):
    """`{layer/variable: array}` from `{path: array}`."""
    return {"/".join(p.split("/")[-2:]): v for p, v in weights.items()}


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def numpy_delta(current, reference, alpha, attention=None):
    """alpha * mean_b 1/2 sum_j C a_j mean_positions (FM - FM0)^2."""
    squared = (current - reference) ** 2
    if squared.ndim > 2:
        squared = squared.mean(axis=tuple(range(1, squared.ndim - 1)))
    channels = squared.shape[-1]
    weights = np.ones(channels) if attention is None else channels * attention
    return alpha * np.mean(0.5 * (squared * weights).sum(-1))


def numpy_bss(features, eta, k):
    s = np.linalg.svd(features.reshape(len(features), -1), compute_uv=False)
    return eta * np.sum(np.sort(s)[:k] ** 2)


def numpy_lwf(current, recorded, weight, temperature):
    targets = softmax(recorded / temperature)
    return weight * np.mean(
        -(targets * log_softmax(current / temperature)).sum(-1)
    )


def numpy_co_tuning(source_logits, table, y, weight):
    return weight * np.mean(-(table[y] * log_softmax(source_logits)).sum(-1))


def all_terms(attention=None):
    return [
        fs.DELTA(["hidden", "features"], alpha=0.3, attention=attention),
        fs.BSS(eta=0.01, k=2),
        fs.LwF(weight=0.7, temperature=2.0),
        fs.CoTuning(relationship(), weight=1.3),
    ]


def test_each_term_equals_the_papers_formula_on_a_dense_model():
    model = dense_model()
    w0 = short(weights_of(model))
    head = source_head()
    v0 = {"kernel": to_numpy(head.kernel), "bias": to_numpy(head.bias)}
    attention = {"hidden": np.linspace(1, 2, 7) / np.linspace(1, 2, 7).sum()}
    terms = all_terms(attention)
    wrapped = fs.FeatureRegularized(model, terms, source_head=head)
    perturb(model)
    perturb(head, seed=8)
    w = short(weights_of(model))
    v = {"kernel": to_numpy(head.kernel), "bias": to_numpy(head.bias)}
    x, y = dense_data()
    out = wrapped(x, training=True)
    values = {
        k: float(to_numpy(t))
        for k, t in wrapped.feature_penalties(out, y).items()
    }
    h, f, logits = numpy_forward(w, x)
    h0, f0, _ = numpy_forward(w0, x)
    np.testing.assert_allclose(
        to_numpy(out["target_logits"]), logits, rtol=1e-5, atol=1e-6
    )
    delta = numpy_delta(h, h0, 0.3, attention["hidden"]) + numpy_delta(
        f, f0, 0.3
    )
    source = f @ v["kernel"] + v["bias"]
    recorded = f0 @ v0["kernel"] + v0["bias"]
    expected = {
        terms[0].name: delta,
        terms[1].name: numpy_bss(f, 0.01, 2),
        terms[2].name: numpy_lwf(source, recorded, 0.7, 2.0),
        terms[3].name: numpy_co_tuning(source, relationship(), y, 1.3),
    }
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert value > 1e-4, name
        np.testing.assert_allclose(values[name], value, rtol=RTOL, err_msg=name)


def test_delta_averages_positions_of_conv_feature_maps():
    model = conv_model()
    attention = {"relu": np.array([0.1, 0.2, 0.3, 0.4], "float32")}
    term = fs.DELTA(["relu", "conv"], alpha=0.5, attention=attention)
    wrapped = fs.FeatureRegularized(model, [term])
    perturb(model)
    x, y = conv_data()
    out = wrapped(x, training=True)
    extras = {k: to_numpy(t) for k, t in out["feature_terms"]["model"].items()}
    reference = {
        k: to_numpy(t) for k, t in out["feature_terms"]["reference"].items()
    }
    assert extras["relu"].shape == (8, 4, 4, 4)
    # The reference is the pretrained copy, BN in inference mode.
    copy = conv_model()
    maps = keras.Model(
        copy.layers[0].input, copy.layers[0].get_layer("relu").output
    )
    np.testing.assert_allclose(
        reference["relu"], to_numpy(maps(x)), rtol=1e-5, atol=1e-6
    )
    expected = numpy_delta(
        extras["relu"], reference["relu"], 0.5, attention["relu"]
    ) + numpy_delta(extras["conv"], reference["conv"], 0.5)
    value = float(to_numpy(wrapped.feature_penalties(out, y)[term.name]))
    np.testing.assert_allclose(value, expected, rtol=RTOL)


def _gradient(term, extras, key, y=None):
    """The term's value and gradient w.r.t. `extras[key]` (a variable)."""
    variable = keras.Variable(extras[key])

    def value():
        return term.penalty({**extras, key: variable.value}, y)

    return value_and_gradients(value, [variable])


def test_delta_gradient_is_the_analytic_one():
    rng = np.random.default_rng(0)
    current = rng.normal(size=(3, 2, 5, 4)).astype("float32")
    reference = rng.normal(size=(3, 2, 5, 4)).astype("float32")
    attention = np.array([0.1, 0.2, 0.3, 0.4], "float32")
    term = fs.DELTA(["maps"], alpha=0.7, attention={"maps": attention})
    variable = keras.Variable(current)

    def value():
        return term.penalty(
            {
                "model": {"maps": variable.value},
                "reference": {"maps": reference},
            },
            None,
        )

    loss, (grad,) = value_and_gradients(value, [variable])
    np.testing.assert_allclose(
        loss, numpy_delta(current, reference, 0.7, attention), rtol=RTOL
    )
    # d/dFM of alpha/B * 1/2 * C a_j * mean_positions (FM - FM0)^2.
    expected = 0.7 / 3 * 4 * attention * (current - reference) / 10
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_bss_gradient_through_numpy_svd():
    features = np.random.default_rng(1).normal(size=(6, 4)).astype("float32")
    term = fs.BSS(eta=0.2, k=2)
    loss, (grad,) = _gradient(term, {"features": features}, "features")
    u, s, vt = np.linalg.svd(features.astype("float64"), full_matrices=False)
    np.testing.assert_allclose(loss, numpy_bss(features, 0.2, 2), rtol=RTOL)
    # d sigma_i^2 / dF = 2 sigma_i u_i v_i^T, the two smallest (last) ones.
    expected = sum(0.2 * 2 * s[i] * np.outer(u[:, i], vt[i]) for i in (2, 3))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_lwf_and_co_tuning_gradients_are_the_analytic_ones():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 5)).astype("float32")
    recorded = rng.normal(size=(4, 5)).astype("float32")
    extras = {"source_logits": logits, "reference_source_logits": recorded}
    lwf = fs.LwF(weight=0.6, temperature=2.0)
    loss, (grad,) = _gradient(lwf, extras, "source_logits")
    np.testing.assert_allclose(
        loss, numpy_lwf(logits, recorded, 0.6, 2.0), rtol=RTOL
    )
    # d/dz of -sum softmax(r/T) log softmax(z/T), averaged over the batch.
    expected = 0.6 / 4 / 2.0 * (softmax(logits / 2.0) - softmax(recorded / 2.0))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)

    table = relationship()
    y = np.array([0, 2, 1, 2])
    co_tuning = fs.CoTuning(table, weight=1.5)
    loss, (grad,) = _gradient(co_tuning, extras, "source_logits", y)
    np.testing.assert_allclose(
        loss, numpy_co_tuning(logits, table, y, 1.5), rtol=RTOL
    )
    expected = 1.5 / 4 * (softmax(logits) - table[y])
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    # One-hot labels pick the same rows.
    one_hot = np.eye(3, dtype="float32")[y]
    value = float(to_numpy(co_tuning.penalty(extras, one_hot)))
    np.testing.assert_allclose(
        value, numpy_co_tuning(logits, table, y, 1.5), rtol=RTOL
    )


def test_training_loss_is_target_loss_plus_terms_plus_l2_sp_once():
    model = dense_model()
    keras_sp.regularize(
        model,
        "l2_sp",
        alpha=0.2,
        beta=0.05,
        new_layers=[model.get_layer("head")],
    )
    w0 = short(weights_of(model))
    head = source_head()
    v0 = {"kernel": to_numpy(head.kernel), "bias": to_numpy(head.bias)}
    wrapped = fs.FeatureRegularized(model, all_terms(), source_head=head)
    perturb(model)
    w = short(weights_of(model))
    x, y = dense_data()
    wrapped.compile(
        keras.optimizers.SGD(0.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    logged = wrapped.fit(x, y, batch_size=8, epochs=1, verbose=0)
    h, f, logits = numpy_forward(w, x)
    h0, f0, _ = numpy_forward(w0, x)
    target = np.mean(-log_softmax(logits)[np.arange(8), y])
    source = f @ v0["kernel"] + v0["bias"]
    recorded = f0 @ v0["kernel"] + v0["bias"]
    terms = (
        numpy_delta(h, h0, 0.3)
        + numpy_delta(f, f0, 0.3)
        + numpy_bss(f, 0.01, 2)
        + numpy_lwf(source, recorded, 0.7, 2.0)
        + numpy_co_tuning(source, relationship(), y, 1.3)
    )
    kernels = ("hidden/kernel", "features/kernel")
    penalty = 0.2 / 2 * sum(np.sum((w[k] - w0[k]) ** 2) for k in kernels)
    penalty += 0.05 / 2 * np.sum(w["head/kernel"] ** 2)
    np.testing.assert_allclose(
        logged.history["loss"][0], target + terms + penalty, rtol=RTOL
    )
    # evaluate: the target loss and the weight penalty, without the terms.
    evaluated = wrapped.evaluate(x, y, batch_size=8, verbose=0)
    np.testing.assert_allclose(evaluated, target + penalty, rtol=RTOL)
    np.testing.assert_allclose(
        wrapped.predict(x, verbose=0), logits, rtol=1e-5, atol=1e-6
    )


def test_frozen_copy_is_bit_identical_after_fit_and_shares_nothing():
    model = conv_model()
    wrapped = fs.FeatureRegularized(
        model, [fs.DELTA(["relu"], alpha=1.0), fs.BSS(k=1)]
    )
    before = [to_numpy(v) for v in wrapped.reference.weights]
    model_before = [to_numpy(v) for v in model.weights]
    np.testing.assert_array_equal(
        np.concatenate([b.ravel() for b in before]),
        np.concatenate([b.ravel() for b in model_before]),
    )
    shared = {id(v) for v in model.weights} & {
        id(v) for v in wrapped.reference.weights
    }
    assert not shared
    assert not wrapped.reference.trainable_weights
    wrapped.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    x, y = conv_data()
    wrapped.fit(x, y, batch_size=4, epochs=2, verbose=0)
    for variable, value in zip(wrapped.reference.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(variable), value)
    # The model itself (including BN moving statistics) did train.
    changed = [
        not np.array_equal(to_numpy(v), b)
        for v, b in zip(model.weights, model_before, strict=True)
    ]
    assert all(changed)


def _term_setups():
    table = relationship(3, 5)
    return {
        "delta": lambda: (
            [
                fs.DELTA(
                    ["hidden"],
                    alpha=0.5,
                    attention={"hidden": np.full(7, 1 / 7, "float32")},
                )
            ],
            None,
        ),
        "bss": lambda: ([fs.BSS(eta=0.1, k=2, layer="hidden")], None),
        "lwf": lambda: ([fs.LwF(weight=0.5)], source_head()),
        "co_tuning": lambda: ([fs.CoTuning(table, weight=0.5)], source_head()),
    }


@pytest.mark.parametrize("kind", ["delta", "bss", "lwf", "co_tuning"])
def test_save_load_round_trip_and_bit_identical_resume(kind, tmp_path):
    terms, head = _term_setups()[kind]()
    model = dense_model()
    keras_sp.regularize(
        model,
        "l2_sp",
        alpha=0.1,
        beta=0.01,
        new_layers=[model.get_layer("head")],
    )
    wrapped = fs.FeatureRegularized(model, terms, source_head=head)
    wrapped.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = dense_data()
    wrapped.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "wrapped.keras")
    wrapped.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is fs.FeatureRegularized
    assert [type(t) for t in loaded.terms] == [type(t) for t in terms]
    assert loaded.terms[0].get_config() == terms[0].get_config()
    for a, b in zip(wrapped.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    first = wrapped.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    second = loaded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert first.history["loss"] == second.history["loss"]
    for a, b in zip(wrapped.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # The L2-SP penalty came back with the model, and counts once.
    assert len(loaded.losses) == len(wrapped.losses) == 3
    np.testing.assert_allclose(
        sum(float(to_numpy(t)) for t in loaded.losses),
        sum(float(to_numpy(t)) for t in wrapped.losses),
        rtol=RTOL,
    )


def test_arrays_are_variables_not_config():
    terms = all_terms({"hidden": np.full(7, 1 / 7, "float32")})
    for term in terms:
        config = term.get_config()
        assert all(
            not isinstance(value, (np.ndarray, list))
            or all(isinstance(i, (int, str)) for i in value)
            for value in config.values()
        ), config
    assert terms[0].get_config()["attention_channels"] == {"hidden": 7}
    assert terms[3].get_config()["relationship_shape"] == [3, 5]
    np.testing.assert_array_equal(
        to_numpy(terms[3].relationship), relationship()
    )


def _unchanged(model, before):
    for variable, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(variable), value)
    for layer in model.layers:
        assert "call" not in layer.__dict__


def test_bad_inputs_at_construction_name_the_argument():
    model = dense_model()
    before = [to_numpy(v) for v in model.weights]
    cases = [
        (
            lambda: fs.FeatureRegularized(model, [fs.DELTA(["nope"])]),
            "layers='nope'",
        ),
        (
            lambda: fs.FeatureRegularized(model, [fs.BSS(layer="nope")]),
            "layer='nope'",
        ),
        (lambda: fs.FeatureRegularized(model, [fs.LwF()]), "source_head=None"),
        (
            lambda: fs.FeatureRegularized(model, [fs.CoTuning(relationship())]),
            "source_head=None",
        ),
        (
            lambda: fs.FeatureRegularized(model, [fs.BSS()], features="nope"),
            "features='nope'",
        ),
        (lambda: fs.FeatureRegularized(model, ["delta"]), "terms="),
        (
            lambda: fs.DELTA(["hidden"], attention={"hidden": np.ones((7, 2))}),
            "shape (7, 2)",
        ),
        (
            lambda: fs.DELTA(["hidden"], attention={"other": np.ones(7)}),
            "'other'",
        ),
        (
            lambda: fs.DELTA(["hidden"], attention={"hidden": -np.ones(7)}),
            "non-negative",
        ),
        (lambda: fs.BSS(k=0), "k=0"),
        (lambda: fs.LwF(temperature=0.0), "temperature=0.0"),
        (lambda: fs.CoTuning(np.ones(3)), "shape (3,)"),
        (lambda: fs.CoTuning(np.ones((3, 5))), "row sums"),
        (lambda: fs.CoTuning(), "relationship=None"),
    ]
    for make, message in cases:
        with pytest.raises(
            ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
        ):
            make()
    _unchanged(model, before)


def _first_step(wrapped, x, y):
    wrapped.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    wrapped.fit(x, y, batch_size=len(x), epochs=1, verbose=0)


def test_bad_inputs_known_at_the_first_step():
    x, y = dense_data()
    cases = [
        # k larger than the batch (4) / than the feature dimension (4).
        (
            lambda m: fs.FeatureRegularized(m, [fs.BSS(k=5)]),
            x[:4],
            y[:4],
            "batch size 4. Received: k=5",
        ),
        (
            lambda m: fs.FeatureRegularized(m, [fs.BSS(k=5)]),
            x,
            y,
            "feature dimension 4. Received: k=5",
        ),
        (
            lambda m: fs.FeatureRegularized(
                m, [fs.CoTuning(relationship(4, 5))], source_head=source_head()
            ),
            x,
            y,
            r"\(3, 5\). Received: relationship of shape \(4, 5\)",
        ),
        (
            lambda m: fs.FeatureRegularized(
                m,
                [fs.DELTA(["hidden"], attention={"hidden": np.full(6, 1 / 6)})],
            ),
            x,
            y,
            r"Received: attention\['hidden'\] of shape \(6,\)",
        ),
    ]
    for make, xs, ys, message in cases:
        model = dense_model()
        before = [to_numpy(v) for v in model.weights]
        wrapped = make(model)
        with pytest.raises(ValueError, match=message):
            _first_step(wrapped, xs, ys)
        _unchanged(model, before)


def test_shapes_that_differ_between_the_networks_are_refused():
    term = fs.DELTA(["maps"])
    extras = {
        "model": {"maps": np.zeros((2, 4, 4, 3))},
        "reference": {"maps": np.zeros((2, 3, 3, 3))},
    }
    with pytest.raises(ValueError, match="'maps'.*shapes differ"):
        term.check_shapes(extras, np.zeros((2, 3)))
