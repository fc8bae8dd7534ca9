"""GrowLayer and ScaledL2Normalization against NumPy closed forms."""

import io
import os
import zipfile

import h5py
import keras
import numpy as np
import pytest
from backend import to_numpy
from backend import value_and_gradients

import keras_sp
from keras_sp import surgery
from keras_sp.layers import GrowLayer
from keras_sp.layers import ScaledL2Normalization


def _dense(units=6, inputs=5, activation="tanh", name="fc"):
    layer = keras.layers.Dense(units, activation=activation, name=name)
    layer.build((None, inputs))
    return layer


def _conv(filters=4, channels=3, name="conv"):
    layer = keras.layers.Conv2D(
        filters, 3, padding="same", activation="tanh", name=name
    )
    layer.build((None, 6, 6, channels))
    return layer


def _numpy_dense(x, kernel, bias):
    return np.tanh(x @ kernel + bias)


def _gradients(model, variables, x, y):
    """d(cross-entropy)/d(variables) on the current backend."""

    def loss():
        logits = model(x, training=True)
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True
            )
        )

    return value_and_gradients(loss, variables)[1]


def test_dense_output_at_initialisation_matches_numpy():
    fc = _dense()
    grow = GrowLayer(fc, channels=3, scale_init=7.0)
    x = np.random.default_rng(0).normal(size=(8, 5)).astype("float32")
    y = to_numpy(grow(x))
    h = _numpy_dense(x, fc.kernel.numpy(), fc.bias.numpy())
    new = grow.new_layer
    h_new = _numpy_dense(x, new.kernel.numpy(), new.bias.numpy())
    assert y.shape == (8, 9)
    np.testing.assert_allclose(
        y[:, :6], 7.0 * h / np.linalg.norm(h, axis=1, keepdims=True), rtol=1e-5
    )
    np.testing.assert_allclose(
        y[:, 6:],
        7.0 * h_new / np.linalg.norm(h_new, axis=1, keepdims=True),
        rtol=1e-5,
    )
    np.testing.assert_allclose(np.linalg.norm(y[:, :6], axis=1), 7.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y[:, 6:], axis=1), 7.0, rtol=1e-5)


def test_conv2d_norm_is_per_spatial_position():
    conv = _conv()
    grow = GrowLayer(conv, channels=2, scale_init=10.0)
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    y = to_numpy(grow(x))
    h = to_numpy(conv(x))
    h_new = to_numpy(grow.new_layer(x))
    assert y.shape == (2, 6, 6, 6)
    np.testing.assert_allclose(
        y[..., :4],
        10.0 * h / np.linalg.norm(h, axis=-1, keepdims=True),
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        y[..., 4:],
        10.0 * h_new / np.linalg.norm(h_new, axis=-1, keepdims=True),
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(np.linalg.norm(y[..., :4], axis=-1), 10.0, 1e-5)
    np.testing.assert_allclose(np.linalg.norm(y[..., 4:], axis=-1), 10.0, 1e-5)
    # A position where every activation is 0 stays 0 (epsilon, no NaN).
    np.testing.assert_array_equal(
        to_numpy(grow(np.zeros((1, 6, 6, 3), "float32"))), 0.0
    )


def test_gamma_scales_each_channel_and_normalize_false_is_concatenation():
    fc = _dense()
    grow = GrowLayer(fc, channels=3)
    x = np.random.default_rng(2).normal(size=(4, 5)).astype("float32")
    grow(x)
    gamma = np.arange(1, 10, dtype="float32")
    grow.gamma.assign(gamma)
    h = _numpy_dense(x, fc.kernel.numpy(), fc.bias.numpy())
    new = grow.new_layer
    h_new = _numpy_dense(x, new.kernel.numpy(), new.bias.numpy())
    unit = np.concatenate(
        [
            h / np.linalg.norm(h, axis=1, keepdims=True),
            h_new / np.linalg.norm(h_new, axis=1, keepdims=True),
        ],
        axis=1,
    )
    np.testing.assert_allclose(to_numpy(grow(x)), gamma * unit, rtol=1e-5)

    plain = GrowLayer(fc, channels=3, normalize=False)
    y = to_numpy(plain(x))
    h_new = _numpy_dense(
        x, plain.new_layer.kernel.numpy(), plain.new_layer.bias.numpy()
    )
    np.testing.assert_allclose(y, np.concatenate([h, h_new], 1), rtol=1e-5)
    assert [w.name for w in plain.weights if w.name == "gamma"] == []


def test_wrapped_weights_untouched_and_new_variables_named_like_a_layer():
    fc = _dense()
    kernel = fc.kernel.numpy().copy()
    grow = GrowLayer(fc, channels=3, name="fc_grow")
    grow(np.ones((1, 5), "float32"))
    assert grow.layer is fc
    assert grow.new_layer.name == "fc_grow_new"
    np.testing.assert_array_equal(fc.kernel.numpy(), kernel)
    assert grow.new_layer.kernel.name == "kernel"
    assert grow.new_layer.bias.name == "bias"
    assert tuple(grow.new_layer.kernel.shape) == (5, 3)
    assert grow.gamma.name == "gamma"
    assert grow.compute_output_shape((None, 5)) == (None, 9)


def test_gradients_reach_new_kernel_and_gamma_in_closed_form():
    fc = _dense()
    grow = GrowLayer(fc, channels=3, scale_init=5.0)
    x = np.random.default_rng(3).normal(size=(6, 5)).astype("float32")
    weights = np.random.default_rng(4).normal(size=(6, 9)).astype("float32")
    grow(x)
    variables = [grow.gamma, grow.new_layer.kernel, fc.kernel]
    _, (d_gamma, d_new, d_old) = value_and_gradients(
        lambda: keras.ops.sum(keras.ops.multiply(grow(x), weights)), variables
    )
    h = _numpy_dense(x, fc.kernel.numpy(), fc.bias.numpy())
    h_new = _numpy_dense(
        x, grow.new_layer.kernel.numpy(), grow.new_layer.bias.numpy()
    )
    unit = np.concatenate(
        [
            h / np.linalg.norm(h, axis=1, keepdims=True),
            h_new / np.linalg.norm(h_new, axis=1, keepdims=True),
        ],
        axis=1,
    )
    # dL/dgamma_i = sum_n w_ni * hhat_ni.
    np.testing.assert_allclose(d_gamma, (weights * unit).sum(0), rtol=1e-4)
    assert np.linalg.norm(d_new) > 0 and np.linalg.norm(d_old) > 0


def test_keras_file_round_trip_gives_identical_outputs(tmp_path):
    inputs = keras.Input((5,))
    fc = _dense()
    grow = GrowLayer(fc, channels=3, scale_init=20.0, name="fc_grow")
    outputs = keras.layers.Dense(2, name="head")(grow(inputs))
    model = keras.Model(inputs, outputs)
    grow.gamma.assign(np.linspace(1, 3, 9).astype("float32"))
    path = os.path.join(tmp_path, "grown.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(5).normal(size=(4, 5)).astype("float32")
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    restored = loaded.get_layer("fc_grow")
    assert isinstance(restored, GrowLayer)
    assert (restored.channels, restored.scale_init) == (3, 20.0)
    assert sorted(v.path for v in loaded.weights) == sorted(
        v.path for v in model.weights
    )

    config = grow.get_config()
    clone = GrowLayer.from_config(config)
    clone(x)
    clone.set_weights(grow.get_weights())
    np.testing.assert_array_equal(to_numpy(clone(x)), to_numpy(grow(x)))

    # Configs saved before the argument was renamed hold "units".
    old = dict(config)
    old["units"] = old.pop("channels")
    clone = GrowLayer.from_config(old)
    assert clone.channels == 3 and clone.new_layer.units == 3
    clone(x)
    clone.set_weights(grow.get_weights())
    np.testing.assert_array_equal(to_numpy(clone(x)), to_numpy(grow(x)))


def test_scaled_l2_normalization_matches_numpy_and_round_trips(tmp_path):
    x = np.random.default_rng(6).normal(size=(3, 4, 4, 5)).astype("float32")
    layer = ScaledL2Normalization(scale_init=3.0)
    layer(x)
    gamma = np.array([1, 2, 3, 4, 5], "float32")
    layer.gamma.assign(gamma)
    expected = gamma * x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5)

    inputs = keras.Input((4, 4, 5))
    model = keras.Model(inputs, ScaledL2Normalization(2.0)(inputs))
    path = os.path.join(tmp_path, "scale.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    with pytest.raises(ValueError, match="Received: scale_init=0"):
        ScaledL2Normalization(scale_init=0)


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (
            lambda: keras.layers.Dense(3),
            {"channels": 2},
            "must be built.*Received: layer=",
        ),
        (
            lambda: keras.layers.Dropout(0.5),
            {"channels": 2},
            "Dense or Conv2D.*type Dropout",
        ),
        (_dense, {"channels": 0}, "Received: channels=0"),
        (_dense, {"channels": 2.0}, "Received: channels=2.0"),
        (
            _dense,
            {"channels": 2, "scale_init": 0.0},
            "Received: scale_init=0.0",
        ),
        (_dense, {"channels": 2, "scale_init": -1}, "Received: scale_init=-1"),
        (_dense, {"channels": 2, "epsilon": 0}, "Received: epsilon=0"),
        (_dense, {"channels": 2, "normalize": 1}, "Received: normalize=1"),
    ],
)
def test_bad_arguments_raise_value_error(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrowLayer(make(), **kwargs)


def test_channels_first_conv_is_rejected():
    conv = keras.layers.Conv2D(4, 3, data_format="channels_first")
    conv.build((None, 3, 6, 6))
    with pytest.raises(ValueError, match="channels_last.*channels_first"):
        GrowLayer(conv, channels=2)


def test_regularize_shared_wrapped_layer_and_new_channels():
    """The pretrained layer is pulled to w0, the new kernel toward 0."""
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="relu", name="fc"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    grown = surgery.widen(model, "fc", channels=3)
    keras_sp.regularize(
        grown,
        "l2_sp",
        alpha=0.1,
        beta=0.01,
        new_layers=["head", "fc_grow_new"],
    )
    fc = grown.get_layer("fc_grow").layer
    new = grown.get_layer("fc_grow").new_layer
    head = grown.get_layer("head")
    w0 = fc.kernel.numpy().copy()
    fc.kernel.assign(w0 + 0.5)
    expected = (
        0.1 / 2 * np.sum((fc.kernel.numpy() - w0) ** 2)
        + 0.01 / 2 * np.sum(new.kernel.numpy() ** 2)
        + 0.01 / 2 * np.sum(head.kernel.numpy() ** 2)
    )
    total = float(sum(to_numpy(loss) for loss in grown.losses))
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    assert set(keras_sp.starting_point(grown)) == {fc.kernel.path}


def test_normalisation_brings_new_channels_gradient_closer_to_old():
    """The paper's motivation: small new channels learn slowly unless their
    activations are normalised and rescaled like the old ones."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 10)).astype("float32")
    y = rng.integers(0, 3, size=64)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu", name="fc"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)  # "pretrained"
    ratios = {}
    for normalize in (True, False):
        keras.utils.set_random_seed(0)
        grown = surgery.widen(
            model,
            "fc",
            channels=16,
            normalize=normalize,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        )
        grow = grown.get_layer("fc_grow")
        old, new = _gradients(
            grown, [grow.layer.kernel, grow.new_layer.kernel], x, y
        )
        ratios[normalize] = np.linalg.norm(new) / np.linalg.norm(old)
    distance = {key: abs(np.log(value)) for key, value in ratios.items()}
    assert ratios[False] < 0.05
    assert distance[True] < distance[False]


def _as_saved_before_the_rename(path, old_path):
    """Rewrites a `.keras` file as GrowLayer files were saved before its
    argument `units` became `channels` and its sublayer `new_units` became
    `new_layer`."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old_path, "w") as out:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                text = data.decode()
                assert '"channels": 3' in text
                data = text.replace('"channels": 3', '"units": 3').encode()
            elif item.filename == "model.weights.h5":
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "r+") as weights:
                    weights.move(
                        "layers/grow_layer/new_layer",
                        "layers/grow_layer/new_units",
                    )
                data = buffer.getvalue()
            out.writestr(item, data)


def test_files_saved_before_the_rename_load(tmp_path):
    inputs = keras.Input((5,))
    grow = GrowLayer(_dense(), channels=3, name="fc_grow")
    outputs = keras.layers.Dense(2, name="head")(grow(inputs))
    model = keras.Model(inputs, outputs)
    grow.gamma.assign(np.linspace(1, 3, 9).astype("float32"))
    path = os.path.join(tmp_path, "new.keras")
    model.save(path)
    with zipfile.ZipFile(path) as saved:
        with h5py.File(io.BytesIO(saved.read("model.weights.h5"))) as f:
            assert "layers/grow_layer/new_layer/vars/0" in f
            assert "layers/grow_layer/new_units" not in f
    old_path = os.path.join(tmp_path, "old.keras")
    _as_saved_before_the_rename(path, old_path)
    loaded = keras.saving.load_model(old_path)
    restored = loaded.get_layer("fc_grow")
    assert restored.channels == 3
    np.testing.assert_array_equal(
        restored.new_layer.kernel.numpy(), grow.new_layer.kernel.numpy()
    )
    x = np.random.default_rng(8).normal(size=(4, 5)).astype("float32")
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
