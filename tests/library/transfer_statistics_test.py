"""Tests of keras_sp.transfer_statistics against NumPy brute force.

DELTA's channel attention (Li et al., ICLR 2019, section 3): the increase
of the target loss when one channel of a layer's output is zeroed,
recomputed here by a NumPy forward pass of the same tiny network with that
channel zeroed, then normalised as the public code does
(softmax((d - mean d) / std d / 5)), as the paper writes (softmax(d)), or
not at all. Co-Tuning's category relationship (You et al., NeurIPS 2020,
section 4, direct approach): the per-class average of the source model's
softmax outputs, recomputed with NumPy.
"""

import contextlib
import io

import keras
import numpy as np
import pytest

from keras_sp import transfer_statistics as ts
from tests.library.backend import to_numpy

TOLERANCE = 1e-5
EXAMPLES = 10
CLASSES = 3


def _build_backbone(rng):
    """Conv(3x3, 3 channels, relu) -> BN -> global average pool -> Dense(4,
    relu) 'hidden', with random weights and BN statistics."""
    inputs = keras.Input((5, 5, 2))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    h = keras.layers.Dense(4, activation="relu", name="hidden")(h)
    backbone = keras.Model(inputs, h, name="backbone")
    for variable in backbone.weights:
        shape = tuple(variable.shape)
        if variable.name == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        elif variable.name == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.8, shape)
        variable.assign(value.astype("float32"))
    return backbone


def _build_head(rng, activation=None):
    head = keras.layers.Dense(CLASSES, activation=activation, name="head")
    head.build((None, 4))
    head.kernel.assign(rng.normal(0.0, 1.5, (4, CLASSES)).astype("float32"))
    head.bias.assign(rng.normal(0.0, 0.5, (CLASSES,)).astype("float32"))
    return head


def _data(rng):
    x = rng.normal(size=(EXAMPLES, 5, 5, 2)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    return x, y


def _weights(model):
    return {v.path: to_numpy(v).copy() for v in model.weights}


def _numpy_forward(model, x, zero=None):
    """Logits of the network with channel `zero = (layer name, j)` of that
    layer's output set to 0, in float64."""
    weights = {
        v.path.split("/")[-2] + "/" + v.name: to_numpy(v) for v in model.weights
    }
    x = x.astype("float64")

    def zeroed(name, value):
        if zero is not None and zero[0] == name:
            value = value.copy()
            value[..., zero[1]] = 0.0
        return value

    kernel = weights["conv/kernel"]
    conv = np.zeros((x.shape[0], 3, 3, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            patch = x[:, i : i + 3, j : j + 3, :]
            conv[:, i, j, :] = np.einsum("nabc,abcd->nd", patch, kernel)
    conv = zeroed("conv", np.maximum(conv + weights["conv/bias"], 0.0))
    bn = (conv - weights["bn/moving_mean"]) / np.sqrt(
        weights["bn/moving_variance"] + 1e-3
    ) * weights["bn/gamma"] + weights["bn/beta"]
    bn = zeroed("bn", bn)
    pooled = bn.mean(axis=(1, 2))
    hidden = np.maximum(
        pooled @ weights["hidden/kernel"] + weights["hidden/bias"], 0.0
    )
    hidden = zeroed("hidden", hidden)
    return hidden @ weights["head/kernel"] + weights["head/bias"]


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _cross_entropy(logits, y):
    return -_log_softmax(logits)[np.arange(len(y)), y].mean()


def _brute_force(model, x, y, layer, channels, normalize, loss=None):
    loss = loss or _cross_entropy
    base = loss(_numpy_forward(model, x), y)
    d = np.array(
        [
            loss(_numpy_forward(model, x, (layer, j)), y) - base
            for j in range(channels)
        ]
    )
    if normalize is None:
        return d
    if normalize == "standardized_softmax":
        d = (d - d.mean()) / d.std() / 5.0
    e = np.exp(d - d.max())
    return e / e.sum()


def _functional(rng, activation=None):
    backbone = _build_backbone(rng)
    head = _build_head(rng, activation)
    return keras.Model(backbone.input, head(backbone.output), name="net")


def _nested(rng):
    backbone = _build_backbone(rng)
    return keras.Sequential([backbone, _build_head(rng)], name="outer")


CHANNELS = {"conv": 3, "bn": 3, "hidden": 4}


@pytest.mark.parametrize("normalize", ["standardized_softmax", "softmax", None])
@pytest.mark.parametrize("batch_size", [3, 32])
def test_channel_attention_equals_brute_force(normalize, batch_size):
    rng = np.random.default_rng(0)
    model = _functional(rng)
    x, y = _data(rng)
    attention = ts.channel_attention(
        model,
        x,
        y,
        ["conv", "bn", "hidden"],
        normalize=normalize,
        batch_size=batch_size,
        verbose=0,
    )
    assert list(attention) == ["conv", "bn", "hidden"]
    for name, channels in CHANNELS.items():
        expected = _brute_force(model, x, y, name, channels, normalize)
        assert attention[name].dtype == np.float32
        np.testing.assert_allclose(attention[name], expected, atol=TOLERANCE)
        if normalize is not None:
            assert abs(float(attention[name].sum()) - 1.0) < 1e-6
    # The increases are not all of one sign: none are clipped.
    raw = _brute_force(model, x, y, "conv", 3, None)
    assert np.ptp(raw) > 1e-2


def _residual(rng):
    """x -> Dense(4, relu) 'd1' -> Dense(4, relu) 'd2'; Add(d1, d2) ->
    Dense(3) 'head': zeroing a channel of 'd2' changes one branch of the
    sum, zeroing one of 'd1' changes both."""
    inputs = keras.Input((5,))
    d1 = keras.layers.Dense(4, activation="relu", name="d1")(inputs)
    d2 = keras.layers.Dense(4, activation="relu", name="d2")(d1)
    total = keras.layers.Add(name="add")([d1, d2])
    outputs = keras.layers.Dense(CLASSES, name="head")(total)
    model = keras.Model(inputs, outputs)
    for variable in model.weights:
        value = rng.normal(0.0, 0.9, tuple(variable.shape))
        variable.assign(value.astype("float32"))
    return model


def _numpy_residual(model, x, zero=None):
    w = {v.path: to_numpy(v).astype("float64") for v in model.weights}

    def dense(name, h, relu=True):
        out = h @ w[f"{name}/kernel"] + w[f"{name}/bias"]
        out = np.maximum(out, 0.0) if relu else out
        if zero is not None and zero[0] == name:
            out[:, zero[1]] = 0.0
        return out

    d1 = dense("d1", x.astype("float64"))
    d2 = dense("d2", d1)
    return dense("head", d1 + d2, relu=False)


def test_channel_attention_with_a_skip_connection_equals_brute_force():
    # The outputs kept from the pass with nothing zeroed (the upstream
    # branch of the sum) are reused only where the inputs did not change.
    rng = np.random.default_rng(3)
    model = _residual(rng)
    x = rng.normal(size=(EXAMPLES, 5)).astype("float32")
    y = np.arange(EXAMPLES) % CLASSES
    attention = ts.channel_attention(
        model, x, y, ["d1", "d2"], normalize=None, batch_size=4, verbose=0
    )
    base = _cross_entropy(_numpy_residual(model, x), y)
    for name in ("d1", "d2"):
        expected = [
            _cross_entropy(_numpy_residual(model, x, (name, j)), y) - base
            for j in range(4)
        ]
        np.testing.assert_allclose(attention[name], expected, atol=TOLERANCE)


class _CountingIdentity(keras.layers.Layer):
    calls = 0

    def call(self, inputs):
        type(self).calls += 1
        return inputs


def test_layers_upstream_of_the_zeroed_one_run_once_per_batch():
    # Only what lies downstream of the zeroed layer is recomputed: the
    # layer before it runs once per batch, not once per batch and channel.
    rng = np.random.default_rng(4)
    backbone = _build_backbone(rng)
    inputs = keras.Input((5, 5, 2))
    counted = _CountingIdentity(name="counted")(inputs)
    model = keras.Model(inputs, _build_head(rng)(backbone(counted)))
    x, y = _data(rng)
    _CountingIdentity.calls = 0
    attention = ts.channel_attention(
        model, x, y, ["hidden"], normalize=None, batch_size=3, verbose=0
    )
    assert _CountingIdentity.calls == 4  # ceil(10 / 3) batches
    np.testing.assert_allclose(
        attention["hidden"],
        _brute_force(model, x, y, "hidden", 4, None),
        atol=TOLERANCE,
    )


def test_reference_normalization_is_the_public_code_formula():
    """softmax(z / 5) of the standardised increases is not softmax(d)."""
    rng = np.random.default_rng(0)
    model = _functional(rng)
    x, y = _data(rng)
    reference = ts.channel_attention(model, x, y, "hidden", verbose=0)
    paper = ts.channel_attention(
        model, x, y, "hidden", normalize="softmax", verbose=0
    )
    assert np.max(np.abs(reference["hidden"] - paper["hidden"])) > 1e-3


def test_channel_attention_changes_no_weight():
    rng = np.random.default_rng(1)
    model = _functional(rng)
    x, y = _data(rng)
    before = _weights(model)
    logits = to_numpy(model(x, training=False))
    ts.channel_attention(model, x, y, ["conv", "bn", "hidden"], verbose=0)
    after = _weights(model)
    assert list(before) == list(after)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    for layer in model.layers:
        assert "call" not in layer.__dict__, layer.name
    np.testing.assert_array_equal(to_numpy(model(x, training=False)), logits)


def test_channel_attention_restores_the_layers_after_an_error():
    rng = np.random.default_rng(1)
    model = _functional(rng)
    x, _ = _data(rng)
    with pytest.raises(ValueError, match="class indices in \\[0, 3\\)"):
        ts.channel_attention(model, x, np.full(EXAMPLES, 7), "conv")
    assert "call" not in model.get_layer("conv").__dict__


def test_nested_backbone_layers_are_found():
    rng = np.random.default_rng(2)
    model = _nested(rng)
    x, y = _data(rng)
    attention = ts.channel_attention(
        model, x, y, ["conv", "hidden"], normalize=None, verbose=0
    )
    for name in ("conv", "hidden"):
        expected = _brute_force(model, x, y, name, CHANNELS[name], None)
        np.testing.assert_allclose(attention[name], expected, atol=TOLERANCE)
    backbone = model.layers[0]
    by_object = ts.channel_attention(
        model, x, y, [backbone.get_layer("conv")], normalize=None, verbose=0
    )
    np.testing.assert_array_equal(by_object["conv"], attention["conv"])


def test_softmax_output_model_uses_probabilities():
    rng = np.random.default_rng(3)
    model = _functional(rng, activation="softmax")
    x, y = _data(rng)
    attention = ts.channel_attention(
        model, x, y, "hidden", normalize=None, verbose=0
    )
    expected = _brute_force(model, x, y, "hidden", 4, None)
    np.testing.assert_allclose(attention["hidden"], expected, atol=TOLERANCE)


def test_custom_loss_and_one_hot_labels():
    rng = np.random.default_rng(4)
    model = _functional(rng)
    x, y = _data(rng)
    one_hot = np.eye(CLASSES, dtype="float32")[y]

    def squared_logits(y_true, y_pred):
        return keras.ops.sum(y_pred * y_pred * y_true, axis=-1)

    attention = ts.channel_attention(
        model,
        x,
        one_hot,
        "conv",
        loss=squared_logits,
        normalize=None,
        batch_size=4,
        verbose=0,
    )
    expected = _brute_force(
        model,
        x,
        y,
        "conv",
        3,
        None,
        loss=lambda z, t: np.mean(z[np.arange(len(t)), t] ** 2),
    )
    np.testing.assert_allclose(attention["conv"], expected, rtol=1e-5)
    default = ts.channel_attention(
        model, x, one_hot, "conv", normalize=None, verbose=0
    )
    np.testing.assert_allclose(
        default["conv"],
        _brute_force(model, x, y, "conv", 3, None),
        atol=TOLERANCE,
    )


def test_single_channel_and_equal_increases_give_uniform_attention():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(1, name="one")(inputs)
    # Two channels that the output never reads: both increases are 0.
    unused = keras.layers.Dense(2, name="unused")(inputs)
    h = keras.layers.Concatenate()([h, unused * 0.0])
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    x = np.random.default_rng(5).normal(size=(6, 3)).astype("float32")
    y = np.array([0, 1, 0, 1, 0, 1])
    attention = ts.channel_attention(model, x, y, ["one", "unused"], verbose=0)
    np.testing.assert_array_equal(attention["one"], [1.0])
    np.testing.assert_array_equal(attention["unused"], [0.5, 0.5])


def test_progress_bar_counts_batches_times_channels():
    rng = np.random.default_rng(6)
    model = _functional(rng)
    x, y = _data(rng)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ts.channel_attention(
            model, x, y, ["conv", "hidden"], batch_size=4, verbose=2
        )
    # 3 batches x (3 + 4) channels.
    assert "21/21" in out.getvalue()


# Co-Tuning's category relationship.


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _source_model(rng, activation=None):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation=activation)]
    )
    kernel, bias = model.layers[0].weights
    kernel.assign(rng.normal(0, 2.0, (4, 6)).astype("float32"))
    bias.assign(rng.normal(0, 1.0, (6,)).astype("float32"))
    return model


def _numpy_relationship(model, x, y, classes, temperature=1.0):
    kernel, bias = (to_numpy(v).astype("float64") for v in model.weights)
    p = _softmax((x.astype("float64") @ kernel + bias) / temperature)
    return np.stack([p[y == t].mean(axis=0) for t in range(classes)])


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_category_relationship_equals_per_class_average(batch_size):
    rng = np.random.default_rng(7)
    model = _source_model(rng)
    x = rng.normal(size=(11, 4)).astype("float32")
    y = np.array([2, 0, 1, 2, 2, 0, 1, 1, 0, 2, 1])
    before = _weights(model)
    relationship = ts.category_relationship(
        model, x, y, batch_size=batch_size, verbose=0
    )
    assert relationship.shape == (3, 6)
    assert relationship.dtype == np.float32
    np.testing.assert_allclose(
        relationship, _numpy_relationship(model, x, y, 3), atol=TOLERANCE
    )
    np.testing.assert_allclose(relationship.sum(axis=1), 1.0, atol=1e-6)
    for path, value in before.items():
        np.testing.assert_array_equal(_weights(model)[path], value)


def test_category_relationship_temperature_probabilities_and_one_hot():
    rng = np.random.default_rng(8)
    model = _source_model(rng)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = np.array([0, 1, 2, 1, 3, 3, 0, 2])
    tempered = ts.category_relationship(
        model, x, y[:, None], 4, temperature=2.0, verbose=0
    )
    np.testing.assert_allclose(
        tempered, _numpy_relationship(model, x, y, 4, 2.0), atol=TOLERANCE
    )
    plain = ts.category_relationship(model, x, y, verbose=0)
    assert np.max(np.abs(plain - tempered)) > 1e-2
    probabilities = _source_model(np.random.default_rng(8), "softmax")
    from_probabilities = ts.category_relationship(
        probabilities, x, np.eye(4)[y], from_logits=False, verbose=0
    )
    np.testing.assert_allclose(
        from_probabilities,
        ts.category_relationship(model, x, np.eye(4)[y], verbose=0),
        atol=TOLERANCE,
    )


# Bad input.


def test_category_relationship_class_without_example():
    model = _source_model(np.random.default_rng(9))
    x = np.zeros((4, 4), "float32")
    with pytest.raises(ValueError, match="classes \\[2\\]") as error:
        ts.category_relationship(model, x, np.array([0, 1, 3, 3]))
    assert "no example of class 2" in str(error.value)
    with pytest.raises(ValueError, match="classes \\[2, 3\\]"):
        ts.category_relationship(model, x, np.array([0, 1, 1, 0]), 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"y": np.array([0, 1, 5, 1])}, "in \\[0, 3\\).*\\[5\\]"),
        ({"y": np.array([0, 1, -1, 1]), "num_classes": None}, "\\[-1\\]"),
        ({"y": np.array([0, 1, 1])}, "y of shape \\(3,\\)"),
        ({"y": np.array([0.5, 1, 1, 0])}, "integer class indices"),
        ({"x": np.zeros((0, 4), "float32"), "y": np.zeros(0)}, "0 examples"),
        ({"x": np.zeros((4, 5), "float32")}, "x.shape=\\(4, 5\\)"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"from_logits": False}, "from_logits=True for logits"),
        ({"from_logits": "yes"}, "from_logits='yes'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"verbose": 3}, "verbose=3"),
    ],
)
def test_category_relationship_bad_input(kwargs, message):
    model = _source_model(np.random.default_rng(10))
    arguments = {
        "x": np.ones((4, 4), "float32"),
        "y": np.array([0, 1, 2, 1]),
        "num_classes": 3,
        "verbose": 0,
    }
    arguments.update(kwargs)
    x, y = arguments.pop("x"), arguments.pop("y")
    with pytest.raises(ValueError, match=message):
        ts.category_relationship(model, x, y, **arguments)


def test_category_relationship_rejects_a_non_model_and_bad_outputs():
    with pytest.raises(ValueError, match="source_model of type str"):
        ts.category_relationship("model", np.ones((2, 4)), np.array([0, 1]))
    inputs = keras.Input((4,))
    flat = keras.Model(inputs, keras.ops.sum(inputs, axis=-1, keepdims=True))
    with pytest.raises(ValueError, match="output shape \\(2, 1\\)"):
        ts.category_relationship(
            flat, np.ones((2, 4), "float32"), np.array([0, 1]), verbose=0
        )


@pytest.mark.parametrize(
    "layers, message",
    [
        (["hiden"], "no layer named 'hiden'. Close names: \\['hidden'\\]"),
        (["conv", "conv"], "repeated \\['conv'\\]"),
        ([], "layers=\\[\\]"),
        ([3], "an element 3"),
        (keras.layers.Dense(2, name="stray"), "'stray' is not in model"),
    ],
)
def test_channel_attention_bad_layers(layers, message):
    rng = np.random.default_rng(11)
    model = _functional(rng)
    x, y = _data(rng)
    with pytest.raises(ValueError, match=message):
        ts.channel_attention(model, x, y, layers, verbose=0)


def test_channel_attention_rejects_maps_that_are_not_channel_last():
    inputs = keras.Input((2, 4, 4))
    h = keras.layers.Conv2D(3, 3, data_format="channels_first", name="first")(
        inputs
    )
    h = keras.layers.BatchNormalization(axis=1, name="bn_first")(h)
    h = keras.layers.Flatten()(h)
    total = keras.layers.Lambda(
        lambda t: keras.ops.sum(t, axis=-1), name="total"
    )(h)
    out = keras.layers.Lambda(
        lambda t: keras.ops.stack([t, -t], axis=-1), name="logits"
    )(total)
    model = keras.Model(inputs, out)
    x = np.ones((2, 2, 4, 4), "float32")
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="data_format='channels_first'"):
        ts.channel_attention(model, x, y, "first", verbose=0)
    with pytest.raises(ValueError, match="'bn_first' with axis=1"):
        ts.channel_attention(model, x, y, "bn_first", verbose=0)
    with pytest.raises(ValueError, match="'total' with output shape \\(2,\\)"):
        ts.channel_attention(model, x, y, "total", verbose=0)
    assert "call" not in model.get_layer("total").__dict__


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"y": np.arange(EXAMPLES) % 5}, "in \\[0, 3\\).*\\[3, 4\\]"),
        ({"y": np.zeros(EXAMPLES - 1, "int64")}, "y of shape \\(9,\\)"),
        (
            {"x": np.zeros((0, 5, 5, 2), "float32"), "y": np.zeros(0)},
            "x with 0 examples",
        ),
        ({"x": np.zeros((EXAMPLES, 5, 5), "float32")}, "x.shape="),
        ({"normalize": "zscore"}, "normalize='zscore'"),
        ({"loss": "mse"}, "loss='mse'"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"verbose": "loud"}, "verbose='loud'"),
    ],
)
def test_channel_attention_bad_input(kwargs, message):
    rng = np.random.default_rng(12)
    model = _functional(rng)
    x, y = _data(rng)
    arguments = {"x": x, "y": y, "verbose": 0}
    arguments.update(kwargs)
    x, y = arguments.pop("x"), arguments.pop("y")
    with pytest.raises(ValueError, match=message):
        ts.channel_attention(model, x, y, "conv", **arguments)
    assert "call" not in model.get_layer("conv").__dict__
